"""The base-weight fingerprint: shapes and a few sampled values of the matrices a method adapted.

A delta, a LoReML stage-1 result and a DSEE Omega file record the fingerprint of the base they were
computed on, and check it before they are applied to a model, so none of them can silently land on
the wrong base. It sits with the methods (not with the delta format) because methods check it too.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..quant import dequantize, is_quantized_model, roundtrip, weight_kind
from ..zero import full_numel, full_shape, gathered
from .base import DeltaLinear, count_parameters, name_seed

logger = logging.getLogger("sparse_ft")

FINGERPRINT_SAMPLES = 16
# Sampled values are compared, not hashed, so a base loaded in another dtype still matches.
FINGERPRINT_RTOL = 2e-2


def _sample_positions(numel: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(name_seed(0, "fingerprint:" + name))
    return torch.randint(0, numel, (FINGERPRINT_SAMPLES,), generator=gen)


@torch.no_grad()
def fingerprint(model: nn.Module, names: list[str] | None = None, emulate: dict | None = None) -> dict:
    """Shapes and a few sampled values of the base weights of ``names`` (default: every layer a
    method adapted), plus the parameter count. Collective under ZeRO-3 (call on every rank).

    A quantized weight is sampled dequantized: the values the run computed with, the same on every
    load of the same base with the same settings. ``emulate`` (a delta's ``quantization`` record)
    samples an unquantized weight as that quantization would have loaded it."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if isinstance(m, DeltaLinear)]
    out = {"num_parameters": count_parameters(model), "matrices": {}}
    for name in names:
        weight = modules[name].weight
        shape = list(full_shape(weight))
        with gathered([weight]):
            pos = _sample_positions(full_numel(weight), name).to(weight.device)
            if weight_kind(weight) is not None:
                flat = dequantize(weight).reshape(-1)
            elif emulate is not None and name in emulate.get("modules", ()):
                flat = roundtrip(weight.detach(), emulate).reshape(-1)
            else:
                flat = weight.detach().reshape(-1)
            sample = flat.index_select(0, pos).float().cpu()
        folded = modules[name].folded_into_weight(pos) if isinstance(modules[name], DeltaLinear) else None
        if folded is not None:  # describe the base, not the base plus what the method folded in
            sample = sample - folded.cpu()
        out["matrices"][name] = {"shape": shape, "sample": sample.tolist()}
    return out


def check_fingerprint(expected: dict, model: nn.Module, quantization: dict | None = None) -> None:
    """Raise ``ConfigError`` saying which matrix differs when ``model`` is not the delta's base.

    ``quantization`` is the delta's record of the quantized base it was trained on (None: an
    unquantized one). Onto an unquantized model the check quantizes the sampled matrices the same
    way first; a delta trained on an unquantized base loaded onto a quantized model is checked by
    shape only (quantization moves every weight by more than the tolerance)."""
    modules = dict(model.named_modules())
    for name, want in expected["matrices"].items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ConfigError(f"this delta was trained on a base with a module {name}, which this model lacks "
                              "(wrong base model for the delta)")
        shape = list(full_shape(module.weight))
        if shape != want["shape"]:
            raise ConfigError(f"base weight {name}.weight has shape {shape}, but the delta was trained on a base "
                              f"where it has shape {want['shape']} (wrong base model for the delta)")
    if quantization is None and is_quantized_model(model):
        logger.warning("this delta was trained on an unquantized base and is loaded onto a quantized one: the base "
                       "is checked by shape only")
        return
    got = fingerprint(model, list(expected["matrices"]), emulate=quantization)
    for name, want in expected["matrices"].items():
        a = torch.tensor(want["sample"])
        b = torch.tensor(got["matrices"][name]["sample"])
        err = ((a - b).abs() / (a.abs() + 1e-3)).max().item()
        if err > FINGERPRINT_RTOL:
            raise ConfigError(f"base weight {name}.weight has other values than the base this delta was trained on "
                              f"(sampled entries differ by up to {err:.2g} relative); wrong base model for the delta")
