"""Loading the base model and tokenizer the way DeepSpeed ZeRO-3 needs it."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..ops.cache import cache_root, safe_name
from ..quant import bnb_config, compute_dtype, is_quantized_linear, keep_standard_4bit_layout, require_bnb
from .runtime import device

logger = logging.getLogger("sparse_ft")

# GGUF files already resolved in this process: source path -> converted directory (or None: load it directly).
_converted: dict[str, Path | None] = {}


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF file's converted copy lives: keyed by its name, size and modification time, so a
    replaced file is converted again."""
    st = gguf.stat()
    return cache_root() / "gguf" / f"{safe_name(gguf.stem)}-{st.st_size}-{st.st_mtime_ns}"


def resolve_gguf(mc: ModelConfig) -> ModelConfig:
    """A GGUF base (``model.gguf_file``) as a plain safetensors model directory.

    transformers dequantises a GGUF file on every load (about 20 s for SmolLM2-135M, on every
    rank). The first load converts it once into ``$SPARSE_FT_CACHE/gguf/<name>-<size>-<mtime>/``
    (weights in fp32, config, tokenizer), written to a temporary directory and renamed into place
    under a file lock, so concurrent ranks and runs convert it once and never see half a copy; later
    loads read the copy. The run's records (delta metadata, run_config.yaml) keep naming the GGUF
    file. A GGUF on the hub, or a cache that cannot be written, is loaded directly as before."""
    if not mc.gguf_file:
        return mc
    src = Path(mc.name_or_path).expanduser() / mc.gguf_file
    if not src.is_file():
        return mc
    key = str(src.resolve())
    if key not in _converted:
        dst = gguf_cache_dir(src)
        try:
            if (dst / "config.json").is_file():
                logger.info("GGUF %s: reading its converted safetensors copy %s", src, dst)
            else:
                _convert_gguf(mc, src, dst)
            _converted[key] = dst
        except OSError as e:
            logger.warning("GGUF %s: could not cache a converted copy (%s); dequantising it on each load", src, e)
            _converted[key] = None
    dst = _converted[key]
    if dst is None:
        return mc
    return dataclasses.replace(mc, name_or_path=str(dst), gguf_file=None)


def _convert_gguf(mc: ModelConfig, src: Path, dst: Path) -> None:
    import fcntl

    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f"{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; the others wait here, then read its copy
        if (dst / "config.json").is_file():
            logger.info("GGUF %s: reading the copy another process converted, %s", src, dst)
            return
        for stale in dst.parent.glob(f".{dst.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        t0 = time.perf_counter()
        logger.info("GGUF %s: converting it once into %s (dequantising to fp32; later runs and ranks read the copy)",
                    src, dst)
        try:
            _write_converted(mc, src, tmp)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("GGUF %s: converted in %.1f s", src, time.perf_counter() - t0)


def _write_converted(mc: ModelConfig, src: Path, out: Path) -> None:
    """Dequantise the GGUF file ``src`` and save it as a model directory (fp32 safetensors, config,
    tokenizer) at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _zero3_off():
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                     trust_remote_code=mc.trust_remote_code)
    # transformers keeps a GGUF "quantizer" on the dequantised model, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    del model
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name,
                                  trust_remote_code=mc.trust_remote_code).save_pretrained(str(out))


@contextlib.contextmanager
def _hub_errors(mc: ModelConfig):
    """A model that is neither a local directory nor reachable on the hub (offline, a typo, a gated
    repo) fails with one line naming ``model.name_or_path`` instead of transformers' traceback."""
    try:
        yield
    except OSError as e:
        if Path(mc.name_or_path).expanduser().is_dir():
            raise  # a local model's own I/O error: keep its details
        from ..errors import ConfigError

        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"model.name_or_path = {mc.name_or_path!r} is not a local directory and could not be loaded "
                          f"from the Hugging Face hub ({reason[:200]}); download it first (`hf download "
                          f"{mc.name_or_path} --local-dir DIR`, on a machine with network) and set "
                          "model.name_or_path=DIR, or point it at a local model directory") from None

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

    mc = resolve_gguf(mc)
    kwargs = _common_kwargs(mc)
    if mc.tokenizer:
        kwargs.pop("gguf_file", None)
    with _hub_errors(dataclasses.replace(mc, name_or_path=mc.tokenizer or mc.name_or_path)):
        tok = AutoTokenizer.from_pretrained(mc.tokenizer or mc.name_or_path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_config_only(mc: ModelConfig):
    from transformers import AutoConfig

    mc = resolve_gguf(mc)
    config_file = Path(mc.name_or_path).expanduser() / "config.json"
    if not config_file.is_file():
        with _hub_errors(mc):
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
    t0 = time.perf_counter()
    model = _load_model(resolve_gguf(mc), dtype, ds_config)
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    logger.info("model loaded in %.1f s: %s, %.0fM parameters in %s", time.perf_counter() - t0,
                type(model).__name__, n / 1e6, str(dtype).replace("torch.", ""))
    return model


def _load_model(mc: ModelConfig, dtype: torch.dtype, ds_config: dict | None):
    from transformers import AutoModelForCausalLM

    kwargs = _common_kwargs(mc)
    if mc.attn_implementation:
        kwargs["attn_implementation"] = mc.attn_implementation
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    logger.info("loading model weights from %s%s in %s%s", mc.name_or_path,
                f" ({mc.gguf_file})" if mc.gguf_file else "", str(dtype).replace("torch.", ""),
                ", partitioned by ZeRO-3 as they load" if zero3 and mc.quantization == "none" else "")
    if mc.quantization != "none":
        require_bnb(f"model.quantization = {mc.quantization}")
        kwargs["quantization_config"] = bnb_config(mc.quantization, mc.double_quant,
                                                   compute_dtype(mc.quant_compute_dtype, dtype))
        kwargs["device_map"] = {"": device()}
        if zero3:
            logger.info("model.quantization = %s: ZeRO-3 partitioned loading is skipped; each rank loads the "
                        "quantized model whole, the engine partitions it", mc.quantization)
        with _zero3_off(), _hub_errors(mc):
            model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=dtype, **kwargs)
        keep_standard_4bit_layout(model)  # evaluation before the method is applied must not repack (quant.py)
        _log_quantized(model, mc.quantization)
        return _set_pad(model)
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        _live_hf_ds_configs.append(HfDeepSpeedConfig(ds_config))
        with _hub_errors(mc):
            model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=dtype, **kwargs)
    else:
        # A ZeRO-3 run earlier in this process left its config live: do not partition this one.
        with _zero3_off(), _hub_errors(mc):
            model = AutoModelForCausalLM.from_pretrained(mc.name_or_path, dtype=dtype, **kwargs)
    return _set_pad(model)


def _log_quantized(model, quantization: str) -> None:
    layers = [m for m in model.modules() if is_quantized_linear(m)]
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    logger.info("base loaded with model.quantization = %s: %d linear layers quantized, %.2f GiB of weights held",
                quantization, len(layers), held / 2**30)


def _set_pad(model):
    if getattr(model.generation_config, "pad_token_id", None) is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.generation_config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model
