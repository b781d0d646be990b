"""The compact delta: one safetensors file with what a method trained, plus metadata.

A delta trained on a bitsandbytes-quantized base also records ``quantization``: the scheme, its
settings and the quantized layers (export dequantizes exactly those before merging).

Tensors are keyed ``<module name>.<tensor name>`` (for example
``model.layers.0.self_attn.q_proj.values``); the metadata holds the method config, the base model's
name, a fingerprint of the base weights the delta was trained on, and the sparse-ft version.
Loading checks the fingerprint first, so a delta cannot silently land on the wrong base.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .api import apply, delta_layers, method_config
from .delta_file import FORMAT, read_delta, save_safetensors, tensor_sha256
from .errors import ConfigError
from .methods import config_from_dict
# The fingerprint lives with the methods (they check it too); its names stay importable from here.
from .methods.fingerprint import (FINGERPRINT_RTOL, FINGERPRINT_SAMPLES, _sample_positions,  # noqa: F401
                                  check_fingerprint, fingerprint)
from .quant import quantization_metadata
from .zero import dist_info, full_shape, gathered

logger = logging.getLogger("sparse_ft")
def _full_tensor(tensor: torch.Tensor, use_fp32_master: bool) -> torch.Tensor:
    """The whole tensor on CPU. With an engine, a trained parameter's fp32 master copy (the
    optimizer's, under bf16/fp16 training) rather than the rounded low-precision module copy."""
    if use_fp32_master and isinstance(tensor, nn.Parameter) and tensor.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(tensor)
        if master is not None:
            return master.detach().reshape(full_shape(tensor)).cpu().clone()
    with gathered([tensor] if isinstance(tensor, nn.Parameter) else []):
        return tensor.detach().cpu().clone()


def delta_state(model: nn.Module, engine=None) -> dict[str, torch.Tensor]:
    """Every tensor the compact delta stores, whole, on CPU. Collective under ZeRO-3."""
    config = method_config(model)
    if config is None:
        raise ConfigError("the model has no sparse-ft method applied: nothing to save")
    named: dict[str, torch.Tensor] = {}
    for name, layer in delta_layers(model):
        for key, tensor in layer.delta_tensors().items():
            named[f"{name}.{key}"] = tensor
    named.update(config.model_delta_tensors(model))
    return {key: _full_tensor(tensor, engine is not None) for key, tensor in named.items()}


def save_delta(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
               extra_metadata: dict | None = None, engine=None, write: bool | None = None) -> Path:
    """Write the compact delta of ``model`` to ``path`` (atomically: a temp file, then rename).

    Under ZeRO-3 call it on every rank (tensors are gathered collectively); rank 0 writes. Pass the
    DeepSpeed ``engine`` to store the optimizer's fp32 master values of trained tensors. ``write``
    picks the writing process (default: rank 0); every process holds the whole delta by then.
    """
    config = method_config(model)
    if engine is not None:
        # ZeRO-3 prefetching can leave parameters in flight after the last forward; settle them
        # before gathering outside a forward pass.
        engine.empty_partition_cache()
    state = delta_state(model, engine)
    # A method that changed the base weights in place (DSEE's pruning) recorded the base's
    # fingerprint before doing so: the delta identifies the base it applies to.
    fp = getattr(model, "sparse_ft_base_fingerprint", None) or fingerprint(model)
    quant = quantization_metadata(model)  # how a quantized base was loaded: export redoes it
    path = Path(path)
    if write is None:
        write = dist_info()[0] == 0
    if write:
        base = base_model or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        meta = {
            "format": FORMAT,
            "sparse_ft_version": __version__,
            "method": json.dumps(config.to_dict()),
            "base_model": str(base),
            "base_fingerprint": json.dumps(fp),
            **({"quantization": json.dumps(quant)} if quant is not None else {}),
            **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()},
        }
        meta["tensor_sha256"] = json.dumps({k: tensor_sha256(v) for k, v in state.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, path, meta)  # atomic: a full disk leaves no half-written file
    return path


def verify_delta_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Each tensor against its checksum in the metadata (deltas written before checksums: none to
    check), then finiteness: a NaN or inf in a delta is never applied or exported."""
    sums = meta.get("tensor_sha256")
    if sums is not None:
        try:
            sums = json.loads(sums)
        except ValueError:
            raise ConfigError(f"delta file {path} is corrupt: its tensor checksums are unreadable") from None
        if set(sums) != set(tensors):
            raise ConfigError(f"delta file {path} is corrupt: it holds tensors {sorted(set(tensors) ^ set(sums))[:3]} "
                              "its checksums do not list (or the reverse)")
        for key, tensor in tensors.items():
            if tensor_sha256(tensor) != sums[key]:
                raise ConfigError(f"delta file {path} is corrupt: tensor {key} does not match its checksum; use "
                                  "another copy (a checkpoint's delta.safetensors) or retrain")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"delta file {path}: tensor {key} holds NaN or inf values; refusing to apply or "
                              "export it (the run diverged, or the file is corrupt)")


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with JSON fields decoded) of a delta file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"delta file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ConfigError(f"{path} is not a sparse-ft delta (format {meta.get('format')!r}, expected "
                                  f"{FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' errors for truncated or garbled files
        raise ConfigError(f"delta file {path} is truncated or not a safetensors file ({str(e).splitlines()[0][:120]}); "
                          "use another copy (a checkpoint's delta.safetensors) or retrain") from None
    verify_delta_tensors(path, tensors, meta)
    decoded = dict(meta)
    try:
        for key in ("method", "base_fingerprint"):
            decoded[key] = json.loads(meta[key])
        decoded["quantization"] = json.loads(meta["quantization"]) if "quantization" in meta else None
    except (KeyError, ValueError) as e:
        raise ConfigError(f"delta file {path} is corrupt: its metadata field {e} is missing or unreadable") from None
    return tensors, decoded


@torch.no_grad()
def load_delta(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Apply the delta in ``path`` to the base ``model`` (in place) and return it.

    The method and its structure (indices, ranks) come from the file. With ``check_base`` the base
    weights are compared with the fingerprint stored at save time first; a mismatch raises
    ``ConfigError`` naming the matrix. Collective under ZeRO-3.
    """
    tensors, meta = read_delta(path)
    config = config_from_dict(meta["method"])
    if check_base:
        check_fingerprint(meta["base_fingerprint"], model, meta["quantization"])
    apply(model, config, delta=tensors)
    targets = {}
    for name, layer in delta_layers(model):
        for key, tensor in layer.delta_tensors().items():
            targets[f"{name}.{key}"] = tensor
    targets.update(method_config(model).model_delta_tensors(model))
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ConfigError(f"delta {path} lacks tensors this method needs, e.g. {missing[:3]}")
    for key, dest in targets.items():
        src = tensors[key]
        with gathered([dest] if isinstance(dest, nn.Parameter) else [], modifier_rank=0):
            if tuple(dest.shape) != tuple(src.shape):
                raise ConfigError(f"delta tensor {key} has shape {tuple(src.shape)}, the model expects {tuple(dest.shape)}")
            dest.data.copy_(src.to(dest.dtype))
    return model
