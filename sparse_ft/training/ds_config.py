"""DeepSpeed JSON configs: find them by name, fill their ``"auto"`` values from the run config."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import ConfigError

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def available() -> list[str]:
    return sorted(p.stem for p in REPO_DS_CONFIGS.glob("*.json")) if REPO_DS_CONFIGS.is_dir() else []


def resolve_ds_config_path(name_or_path: str) -> Path:
    """``zero3`` -> ``ds_configs/zero3.json``; an existing path is returned as is."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    candidate = REPO_DS_CONFIGS / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"deepspeed.config = {name_or_path!r} is neither a file nor a config in {REPO_DS_CONFIGS}; "
                      f"allowed names: {', '.join(available()) or '(none found)'}")


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _find_auto(tree, prefix="") -> list[str]:
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _find_auto(value, f"{prefix}{key}.")
    elif tree == "auto":
        found.append(prefix.rstrip("."))
    return found


def build_ds_config(name_or_path: str, overrides: dict, *, micro_batch_size: int, grad_accum: int,
                    world_size: int, max_grad_norm: float, precision: str, hidden_size: int | None) -> dict:
    """Load the JSON, fill every ``"auto"`` and apply ``overrides``. Fails on an unfilled ``auto``."""
    path = resolve_ds_config_path(name_or_path)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    ds = copy.deepcopy(ds)

    def fill(tree: dict, key: str, value) -> None:
        if tree.get(key) == "auto":
            tree[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size)
    fill(ds, "gradient_accumulation_steps", grad_accum)
    fill(ds, "train_batch_size", micro_batch_size * grad_accum * world_size)
    fill(ds, "gradient_clipping", float(max_grad_norm))
    for key, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if isinstance(ds.get(key), dict):
            fill(ds[key], "enabled", enabled)
    zero = ds.get("zero_optimization", {})
    if hidden_size:
        # The sizes transformers' integration uses: buckets about one hidden x hidden matrix, and
        # tensors below 10 x hidden elements stay whole on every rank.
        fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    _merge(ds, copy.deepcopy(overrides or {}))
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"deepspeed config {path}: cannot fill 'auto' for {', '.join(left)}; "
                          "give a value there or in deepspeed.overrides")
    return ds


def zero_settings(name_or_path: str, overrides: dict | None = None) -> dict:
    """The ``zero_optimization`` section of a DeepSpeed config with ``overrides`` merged, unfilled
    (for checks made before any model is loaded)."""
    path = resolve_ds_config_path(name_or_path)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    _merge(ds, copy.deepcopy(overrides or {}))
    return ds.get("zero_optimization", {}) or {}


def offloaded(name_or_path: str, overrides: dict | None = None) -> dict[str, str]:
    """``{"parameters" | "optimizer": device}`` for what the config offloads (empty: nothing)."""
    zero = zero_settings(name_or_path, overrides)
    out = {}
    for key, what in (("offload_param", "parameters"), ("offload_optimizer", "optimizer")):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            out[what] = device
    return out


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
