"""Choose, per shape and device, how the sparse values' gradient is computed.

On CUDA with Triton the choice between the dense product (``dy^T x`` then gather) and the SDDMM
kernel is *measured* the first time a (device, m, n, tokens, k, dtype) combination is seen: both are
timed with CUDA events, the faster one is remembered in memory and in a JSON file under
``$SPARSE_FT_CACHE`` (default ``~/.cache/sparse_ft``), keyed by the device name, so later runs and
other processes on the same kind of GPU skip the measurement. That one-time timing synchronises the
device; every later call is a dictionary lookup with no host sync.

On CPU the choice is a flop count: the torch gather SDDMM costs about ``k * T`` multiply-adds plus
gathers, the dense product ``m * n * T``.

``SPARSE_FT_SDDMM=dense|sampled|triton`` forces one path (for benchmarks and debugging).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from .cache import read_table, table_file, write_table

_memory: dict[str, str] = {}
_lock = threading.Lock()
_loaded_devices: set[str] = set()
BACKENDS = ("dense", "sampled", "triton", "triton_xt")
MEASURED = ("dense", "triton", "triton_xt")


def _bucket(tokens: int) -> int:
    """Token counts vary batch to batch; decisions are shared within a power-of-two bucket."""
    return 1 << max(0, (tokens - 1).bit_length())


def cache_file(device_name: str) -> Path:
    return table_file("sddmm_crossover", device_name)


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(m: int, n: int, tokens: int, k: int, dtype: torch.dtype, device: torch.device,
           grad_fn: Callable[..., torch.Tensor] | None = None) -> str:
    """The backend for the values' gradient of this shape. On a GPU an unseen shape is measured by
    timing ``grad_fn`` (:func:`sparse_ft.ops.sparse_delta.sampled_weight_grad`, passed by its caller:
    this module sits below it) with each backend."""
    forced = os.environ.get("SPARSE_FT_SDDMM")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SPARSE_FT_SDDMM={forced!r}; allowed: {', '.join(BACKENDS)}")
        return forced
    if device.type != "cuda":
        # Gathering costs several times a fused multiply-add; a factor of 8 covers it on CPUs.
        return "sampled" if 8 * k < m * n else "dense"
    if not triton_available(device):
        return "dense"
    name = torch.cuda.get_device_name(device)
    key = f"{m}x{n}|T{_bucket(tokens)}|k{k}|{str(dtype).replace('torch.', '')}"
    with _lock:
        if name not in _loaded_devices:
            _load(name)
        hit = _memory.get(f"{name}|{key}")
    if hit is not None:
        return hit
    if grad_fn is None:
        raise ValueError("crossover.choose: measuring a new shape on a GPU needs grad_fn (sampled_weight_grad)")
    choice = _measure(m, n, _bucket(tokens), k, dtype, device, grad_fn)
    with _lock:
        _memory[f"{name}|{key}"] = choice
        _save(name)
    return choice


def _load(name: str) -> None:
    _loaded_devices.add(name)
    for key, value in read_table(cache_file(name)).items():
        if value in BACKENDS:
            _memory[f"{name}|{key}"] = value


def _save(name: str) -> None:
    prefix = f"{name}|"
    entries = {k[len(prefix):]: v for k, v in _memory.items() if k.startswith(prefix)}
    write_table(cache_file(name), entries)  # a read-only home only costs a re-measurement next run


def gpu_time_ms(fn, reps: int = 10) -> float:
    """Device time per call of ``fn``, launch overhead excluded: a sleep kernel holds the GPU while
    the calls queue up behind it, so the events bracket back-to-back kernels only (in training the
    CPU runs ahead of the GPU the same way)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(20_000_000)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def measure_both(m: int, n: int, tokens: int, k: int, dtype: torch.dtype, device: torch.device,
                 grad_fn: Callable[..., torch.Tensor], reps: int = 10) -> dict[str, float]:
    """Device milliseconds of the dense and both Triton paths of ``grad_fn`` (``sampled_weight_grad``)
    on random data of this shape (best of three trials each, so one disturbed trial cannot decide)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dy = torch.randn(tokens, m, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(tokens, n, generator=gen).to(device=device, dtype=dtype)
    idx = torch.randperm(m * n, generator=gen)[:k].sort().values.to(device)
    rows = torch.div(idx, n, rounding_mode="floor")
    rows_cols = (rows.int(), (idx - rows * n).int())
    return {backend: min(gpu_time_ms(lambda: grad_fn(dy, x, idx, n, backend=backend, rows_cols=rows_cols), reps)
                         for _ in range(3))
            for backend in MEASURED}


def _measure(m, n, tokens, k, dtype, device, grad_fn) -> str:
    times = measure_both(m, n, tokens, k, dtype, device, grad_fn)
    choice = min(times, key=times.get)
    logging.getLogger("sparse_ft").info(
        "values' gradient for %dx%d, %d tokens, k=%d: %s (%s)", m, n, tokens, k, choice,
        ", ".join(f"{b} {t:.3f} ms" for b, t in times.items()))
    return choice
