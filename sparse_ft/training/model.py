"""Loading the base model and tokenizer the way DeepSpeed ZeRO-3 needs it."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError

logger = logging.getLogger("sparse_ft")

# transformers holds HfDeepSpeedConfig through a weak reference; it must stay alive for as long as
# the model is used, or ZeRO-3 partitioned loading and later gathers silently stop applying.
_live_hf_ds_configs: list = []


def _common_kwargs(mc: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": mc.trust_remote_code}
    if mc.gguf_file:
        kwargs["gguf_file"] = mc.gguf_file
    return kwargs


def load_tokenizer(mc: ModelConfig):
    from transformers import AutoTokenizer

    kwargs = _common_kwargs(mc)
    if mc.tokenizer:
        kwargs.pop("gguf_file", None)
    tok = AutoTokenizer.from_pretrained(mc.tokenizer or mc.name_or_path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_config_only(mc: ModelConfig):
    from transformers import AutoConfig

    config_file = Path(mc.name_or_path).expanduser() / "config.json"
    if not config_file.is_file():
        return AutoConfig.from_pretrained(mc.name_or_path, **_common_kwargs(mc))
    # A local model directory: a damaged or unknown config.json is bad input, said before any weight loads.
    try:
        json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: {config_file} is not valid JSON ({e}); restore the model's "
                          "config.json") from None
    try:
        return AutoConfig.from_pretrained(mc.name_or_path, **_common_kwargs(mc))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.name_or_path: transformers cannot read {config_file} "
                          f"({str(e).splitlines()[0][:160]}); allowed: a config.json whose model_type this "
                          "transformers knows (or set model.trust_remote_code=true for custom code)") from None


@contextlib.contextmanager
def _zero3_off():
    """Hide a live HfDeepSpeedConfig from transformers for the block: with one alive (a ZeRO-3 run
    earlier in this process), ``from_config`` would build under ``deepspeed.zero.Init``."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def meta_model(mc: ModelConfig):
    """The model's module tree on the meta device: names and shapes, no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    config = load_config_only(mc)
    with _zero3_off(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=mc.trust_remote_code)


def load_model(mc: ModelConfig, dtype: torch.dtype, ds_config: dict | None = None):
    """``from_pretrained`` in ``dtype``; with a ZeRO-3 ``ds_config`` weights are partitioned as they
    load (no rank ever holds the whole model).

    With ``mc.quantization`` (nf4, int8) bitsandbytes quantizes the linear layers as they load, on
    this rank's device. ZeRO-3's partitioned loading (``zero.Init``) cannot build bitsandbytes
    layers, so it is skipped: each rank first holds the whole quantized model, and ZeRO-3
    partitions it when the engine is built."""
    from transformers import AutoModelForCausalLM

    kwargs = _common_kwargs(mc)
    if mc.attn_implementation:
        kwargs["attn_implementation"] = mc.attn_implementation
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if mc.quantization != "none":
        from ..quant import bnb_config, compute_dtype, require_bnb
        from .runtime import device

        require_bnb(f"model.quantization = {mc.quantization}")
        kwargs["quantization_config"] = bnb_config(mc.quantization, mc.double_quant,
                                                   compute_dtype(mc.quant_compute_dtype, dtype))
        kwargs["device_map"] = {"": device()}
        if zero3:
            logger.info("model.quantization = %s: ZeRO-3 partitioned loading is skipped; each rank loads the "
                        "quantized model whole, the engine partitions it", mc.quantization)
        with _zero3_off():
            model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=dtype, **kwargs)
        _log_quantized(model, mc.quantization)
        return _set_pad(model)
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        _live_hf_ds_configs.append(HfDeepSpeedConfig(ds_config))
        model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=dtype, **kwargs)
    else:
        # A ZeRO-3 run earlier in this process left its config live: do not partition this one.
        with _zero3_off():
            model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=dtype, **kwargs)
    return _set_pad(model)


def _log_quantized(model, quantization: str) -> None:
    from ..quant import is_quantized_linear

    layers = [m for m in model.modules() if is_quantized_linear(m)]
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    logger.info("base loaded with model.quantization = %s: %d linear layers quantized, %.2f GiB of weights held",
                quantization, len(layers), held / 2**30)


def _set_pad(model):
    if getattr(model.generation_config, "pad_token_id", None) is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.generation_config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model
