"""sparse-ft: sparse parameter-efficient fine-tuning of causal LMs, scaled with DeepSpeed ZeRO-3.

Python API::

    import sparse_ft
    cfg = sparse_ft.RandomMaskConfig(density=1e-3, target_modules=["q_proj", "v_proj"], seed=0)
    model = sparse_ft.apply(model, cfg)
    sparse_ft.trainable_parameters(model)
    sparse_ft.save_delta(model, "delta.safetensors")
    sparse_ft.load_delta(base_model, "delta.safetensors")
    sparse_ft.merge(model)

Layers (imports point down only, not even inside a function; ``lint-imports`` checks the contracts in
``.importlinter``, and docs/contributing.md explains them), top to bottom:

1. ``cli``, ``launch/``; then ``commands`` (command entry points such as ``sparse-ft rpca``)
2. ``export``, ``sweep``
3. ``training/`` and ``config`` (the run's settings; they use each other), then ``tasks/``
4. ``delta`` (save/load a model's compact delta), then ``api`` (apply, merge)
5. ``methods/``: the registry, ``methods/base.py``, ``methods/fingerprint.py`` and one folder per method
6. ``ops/``; then ``zero``, ``quant``, ``rpca``, ``delta_file`` (the delta's file format), ``_version``;
   then ``errors``

What a method needs from a run (LoReML's per-stage settings, ProPETL's task list) reaches it as an
argument (``stages(train)``, ``task_names()`` checked by ``config``), never by importing upward.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import ConfigError

if TYPE_CHECKING:
    from .api import apply, merge, method_config, trainable_parameters
    from .delta import load_delta, save_delta
    from .methods import (METHODS, DSEEConfig, FullFinetuneConfig, LoRAConfig, LoReMLConfig, MethodConfig,
                          ProPETLConfig, RandomMaskConfig)


# The public names load on first use (PEP 562): they import torch, and the `sparse-ft` command line
# must answer `--help` without it.
_LAZY = {**dict.fromkeys(("apply", "merge", "method_config", "trainable_parameters"), ".api"),
         **dict.fromkeys(("load_delta", "save_delta"), ".delta"),
         **dict.fromkeys(("METHODS", "MethodConfig", "RandomMaskConfig", "LoRAConfig", "FullFinetuneConfig",
                          "DSEEConfig", "ProPETLConfig", "LoReMLConfig"), ".methods")}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "apply", "merge", "trainable_parameters", "method_config", "save_delta", "load_delta",
    "ConfigError", "METHODS", "MethodConfig", "RandomMaskConfig", "LoRAConfig", "FullFinetuneConfig", "DSEEConfig",
    "ProPETLConfig", "LoReMLConfig",
    "__version__",
]
