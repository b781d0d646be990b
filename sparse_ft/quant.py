"""Quantized frozen bases (bitsandbytes NF4 or LLM.int8) and 8-bit optimizer state.

The base model loads through transformers' ``BitsAndBytesConfig``: every ``nn.Linear`` except the
output head becomes a ``bnb.nn.Linear4bit`` (weights packed two per byte, per-block absmax) or a
``bnb.nn.Linear8bitLt`` (int8 weights, per-row scale). Those are ``nn.Linear`` subclasses, so the
methods find them as targets; what changes is how the frozen weight is read:

- :func:`base_linear` computes ``x W^T + b`` with bitsandbytes' own kernels (activation-side
  methods: LoRA, DSEE's low-rank part, ProPETL);
- :func:`dequantize` gives one layer's weight in fp32, transiently (the sparse-delta op on a
  quantized base, export, fingerprints, DSEE's RPCA);
- :func:`roundtrip` quantizes and dequantizes a full-precision tensor exactly as loading did, so
  export and fingerprint checks can reproduce the weights a quantized run trained against from the
  unquantized checkpoint on disk.

Everything here imports bitsandbytes lazily: without it installed, nothing in a non-quantized run
touches it.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .errors import ConfigError

logger = logging.getLogger("sparse_ft")

QUANTIZATIONS = ("none", "nf4", "int8")
QUANT_DTYPES = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
# bitsandbytes' default 4-bit block size (transformers does not expose another one).
BLOCKSIZE_4BIT = 64
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@functools.lru_cache(maxsize=1)
def bnb_status() -> str | None:
    """None when bitsandbytes imports and quantizes on this machine's default device; otherwise
    why not (one line, for error messages and test skips)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001 - an import failure of any kind means "not usable"
        return f"bitsandbytes is not importable ({type(e).__name__}: {e}); pip install 'sparse-ft[bnb]'"
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        w = torch.randn(64, 64, device=device)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        F.dequantize_4bit(q, state)
        bnb.optim.AdamW8bit  # noqa: B018 - the optimizer class must exist too
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} has no usable backend here ({type(e).__name__}: {e})"
    return None


def require_bnb(what: str) -> None:
    reason = bnb_status()
    if reason is not None:
        raise ConfigError(f"{what} needs bitsandbytes: {reason}")


# -- recognising quantized layers ------------------------------------------------------------------
def weight_kind(weight: torch.Tensor) -> str | None:
    """``nf4``/``fp4`` for a bitsandbytes 4-bit parameter, ``int8`` for an 8-bit one, else None.
    Decided by class name, so a model without bitsandbytes never imports it."""
    cls = type(weight).__name__
    if cls == "Params4bit":
        return getattr(weight, "quant_type", "nf4")
    if cls == "Int8Params":
        return "int8"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and weight_kind(module.weight) is not None


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


@torch.no_grad()
def dequantize(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out x in) weight a quantized parameter stands for, as a new tensor in ``dtype``.
    A plain tensor is returned as a copy in ``dtype``."""
    kind = weight_kind(weight)
    if kind is None:
        return weight.detach().to(dtype, copy=True)
    import bitsandbytes.functional as F

    if kind == "int8":
        scale = getattr(weight, "SCB", None)
        if scale is None:
            raise ValueError("an int8 weight without its row scales (SCB): was it moved off its device?")
        return F.int8_vectorwise_dequant(weight.data, scale).to(dtype)
    state = weight.quant_state
    if is_repacked_for_cpu(weight):
        raise ValueError("this 4-bit weight was repacked for bitsandbytes' AVX512-BF16 CPU inference kernel; "
                         "sparse-ft reads the standard layout (keep_standard_4bit_layout keeps it)")
    return F.dequantize_4bit(weight.data, state).to(dtype)


# -- which bitsandbytes CPU path the 4-bit layers take -----------------------------------------------
# bitsandbytes (0.49+) has two CPU paths for a ``Linear4bit``. The standard one, on every CPU and in
# training, dequantizes the weight transiently and runs one matmul in the compute dtype (what our own
# sparse ops do). The other is taken only on CPUs with AVX512-BF16 (detected once, when the layer is
# built: ``Linear4bit.support_avx512bf16_for_cpu``), on a forward in eval mode whose input needs no
# gradient: it first repacks the weight IN PLACE for its native kernel (nibbles regrouped by blocks of
# 32 rows, block scales un-nested and rounded to bf16) and then multiplies in bf16. For sparse-ft that
# path is wrong four ways: the repacking fails on layers whose row count is not a multiple of 32 or
# whose input width is not a multiple of the block size (``shape '[64, 1]' is invalid for input of
# size 96``); it computes in bf16 whatever ``quant_compute_dtype`` says; the weight it leaves behind is
# not the one the run loaded (bitsandbytes' inverse re-quantizes bf16-rounded scales), so fingerprints,
# ``quantization_metadata`` and export would describe another base; and its kernel has no backward, so
# training after the first evaluation would lose the gradient through every untargeted layer. So every
# model sparse-ft adapts or loads keeps the standard layout, and all CPUs compute the same numbers.
PACKED_CPU_ATTR = "support_avx512bf16_for_cpu"


def is_repacked_for_cpu(weight: torch.Tensor) -> bool:
    """Whether bitsandbytes has already repacked this 4-bit weight for its AVX512-BF16 CPU kernel."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def keep_standard_4bit_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place AVX512-BF16 repacking on every 4-bit layer of ``model`` (see the
    comment above); returns how many layers it was on for. A layer repacked already (the model ran in
    eval mode on such a CPU before sparse-ft saw it) cannot be put back exactly: ConfigError."""
    switched = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight_kind(weight) in (None, "int8"):
            continue
        if is_repacked_for_cpu(weight):
            raise ConfigError(f"{name}: bitsandbytes repacked this 4-bit weight for its AVX512-BF16 CPU inference "
                              "kernel (the model ran in eval mode before sparse-ft adapted it), which rounds its "
                              "block scales; load the model again and apply sparse-ft before running it")
        if getattr(module, PACKED_CPU_ATTR, False):
            setattr(module, PACKED_CPU_ATTR, False)
            switched += 1
    if switched:
        logger.debug("kept bitsandbytes' standard 4-bit layout on %d layers (no AVX512-BF16 repacking)", switched)
    return switched


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, plain or quantized (a packed weight's own shape is not it)."""
    return module.out_features, module.in_features


def base_linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                training: bool) -> torch.Tensor:
    """``x W^T + b`` for a quantized ``weight``, by the bitsandbytes kernel of ``module`` (the
    original bnb layer, which holds the int8 matmul state). Output in ``x``'s dtype."""
    import bitsandbytes as bnb

    kind = weight_kind(weight)
    if kind == "int8":
        module.training = training
        out = module(x)
        return out.to(x.dtype)
    # Calls the standard matmul, not Linear4bit.forward: on AVX512-BF16 CPUs the latter's inference
    # branch repacks the weight in place (see keep_standard_4bit_layout).
    if is_repacked_for_cpu(weight):
        raise ValueError("a 4-bit weight repacked for bitsandbytes' AVX512-BF16 CPU kernel reached base_linear")
    compute = getattr(module, "compute_dtype", None) or x.dtype
    b = None if bias is None else bias.to(compute)
    return bnb.matmul_4bit(x.to(compute), weight, bias=b, quant_state=weight.quant_state).to(x.dtype)


# -- loading ---------------------------------------------------------------------------------------
def compute_dtype(name: str, default: torch.dtype) -> torch.dtype:
    """``model.quant_compute_dtype`` as a torch dtype; ``auto`` is ``default`` (the run's precision)."""
    return default if name == "auto" else _DTYPES[name]


def bnb_config(quantization: str, double_quant: bool, compute: torch.dtype, skip_modules: list[str] | None = None):
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (nf4 or int8).

    ``bnb_4bit_quant_storage`` is the compute dtype: the packed bytes are then stored in tensors
    of the same dtype as the rest of the model, which ZeRO-3 needs to flatten and shard them."""
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules) if skip_modules else None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_quant_storage=compute, llm_int8_skip_modules=skip)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ConfigError(f"model.quantization = {quantization!r}; allowed: {', '.join(QUANTIZATIONS)}")


# -- metadata, export, fingerprints ----------------------------------------------------------------
def quantization_metadata(model: nn.Module) -> dict | None:
    """What the compact delta records about a quantized base: the scheme, the settings needed to
    redo it from the unquantized checkpoint (:func:`roundtrip`) and which linear layers it covered.
    None for a model with no quantized layer."""
    names, spec = [], None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = weight_kind(weight) if isinstance(weight, torch.Tensor) else None
        if kind is None:
            continue
        names.append(name)
        if spec is None:
            if kind == "int8":
                spec = {"scheme": "int8"}
            else:
                state = weight.quant_state
                spec = {"scheme": kind, "blocksize": int(state.blocksize), "double_quant": bool(state.nested),
                        "quant_storage": _DTYPE_NAMES.get(weight.data.dtype, str(weight.data.dtype))}
            # The dtype the checkpoint was cast to before quantizing (the run's model dtype).
            spec["load_dtype"] = _DTYPE_NAMES.get(model_dtype(model), "fp32")
    if spec is None:
        return None
    return {**spec, "modules": names}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first unquantized floating-point parameter (fp32 if none)."""
    for p in model.parameters():
        if p.is_floating_point() and weight_kind(p) is None:
            return p.dtype
    return torch.float32


@torch.no_grad()
def roundtrip(tensor: torch.Tensor, spec: dict) -> torch.Tensor:
    """``tensor`` (a full-precision weight from the checkpoint) quantized and dequantized as loading
    it under ``spec`` (:func:`quantization_metadata`) did, in fp32: the weight the run trained with."""
    import bitsandbytes.functional as F

    w = tensor.to(_DTYPES.get(spec.get("load_dtype", "fp32"), torch.float32))
    if spec["scheme"] == "int8":
        # Int8Params quantizes the fp16 copy of the weight (bitsandbytes casts before quantizing).
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return F.int8_vectorwise_dequant(cb, scb).float()
    storage = _DTYPES.get(spec.get("quant_storage", ""), torch.uint8)
    q, state = F.quantize_4bit(w, blocksize=spec.get("blocksize", BLOCKSIZE_4BIT),
                               compress_statistics=spec.get("double_quant", False), quant_type=spec["scheme"],
                               quant_storage=storage)
    return F.dequantize_4bit(q, state).float()


# -- optimizers ------------------------------------------------------------------------------------
def make_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (torch's, fused on CUDA) or a bitsandbytes 8-bit AdamW over ``groups``.

    bitsandbytes keeps 32-bit state for tensors under 4096 entries (its ``min_8bit_size``); the
    sparse methods' value vectors are usually larger than that."""
    if name == "adamw":
        fused = {"fused": True} if torch.cuda.is_available() else {}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **fused)
    require_bnb(f"train.optimizer = {name}")
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    if name == "paged_adamw8bit" and not torch.cuda.is_available():
        logger.info("train.optimizer = paged_adamw8bit without CUDA: bitsandbytes pages nothing on CPU and runs it "
                    "as adamw8bit")
    return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
