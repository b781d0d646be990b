"""``train.precision: auto`` on CPU: bf16 where this CPU multiplies bf16 matrices clearly faster
than fp32, fp32 elsewhere.

CPUs differ by two orders of magnitude here: without bf16 instructions (AVX2 machines, Zen 3) a
bf16 matmul is emulated and runs 50-100x slower than fp32, while a Xeon with AMX runs the same
product about 5x faster in bf16. So the choice is measured: one matmul of a transformer-layer shape
in both dtypes, once per machine, and cached in ``$SPARSE_FT_CACHE`` (default
``~/.cache/sparse_ft``) as ``cpu_precision_<cpu model>.json``, keyed by the CPU's model, its
bf16-relevant flags, the torch version and the thread count. Later runs read the table.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from .cache import read_table, table_file, write_table

logger = logging.getLogger("sparse_ft")

MARGIN = 0.8
"""bf16 is chosen only when its matmul takes at most this fraction of fp32's: bf16 rounds every
product, which is worth it only for a real speed-up, not for noise."""

PROBE_SHAPE = (256, 576, 1536)
"""(rows, inner, cols) of the timed product: 256 tokens through a SmolLM2-sized MLP projection;
big enough that kernel choice, not call overhead, decides, small enough that an emulated bf16
product still takes well under a second."""

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "sve", "bf16")
"""The /proc/cpuinfo flags that change how fast a bf16 matmul runs (x86 and Arm)."""

_memory: dict[str, str] = {}


def cpu_identity(cpuinfo: str | None = None) -> tuple[str, str]:
    """(CPU model name, cache key). ``cpuinfo`` is /proc/cpuinfo's text (read here when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    present = ",".join(f for f in FLAGS if f in flags)
    return model, f"{model}|{present}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def decide(times_ms: dict[str, float]) -> str:
    """``bf16`` when its time is at most :data:`MARGIN` times fp32's, else ``fp32``."""
    return "bf16" if times_ms["bf16"] <= MARGIN * times_ms["fp32"] else "fp32"


def _elapsed_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(shape: tuple[int, int, int] = PROBE_SHAPE, reps: int = 3) -> dict[str, float]:
    """Milliseconds of one ``shape`` matmul in fp32 and in bf16 (best of ``reps``)."""
    rows, inner, cols = shape
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(rows, inner, generator=gen), torch.randn(inner, cols, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    # The first call of each dtype selects and prepares its kernel; that one-off must not count.
    a32[:16] @ b32
    a16[:16] @ b16
    fp32 = min(_elapsed_ms(lambda: a32 @ b32) for _ in range(reps))
    bf16 = _elapsed_ms(lambda: a16 @ b16)
    if bf16 <= 4 * fp32:  # a clearly slower (emulated) bf16 needs no repeats to be ruled out
        bf16 = min(bf16, *(_elapsed_ms(lambda: a16 @ b16) for _ in range(reps - 1)))
    return {"fp32": fp32, "bf16": bf16}


def cpu_precision(measure_fn: Callable[[], dict[str, float]] = measure, cpuinfo: str | None = None) -> str:
    """This CPU's choice for ``precision: auto``: from the cache, else measured (and cached)."""
    name, key = cpu_identity(cpuinfo)
    if key in _memory:
        return _memory[key]
    path = table_file("cpu_precision", name)
    table = read_table(path)
    hit = table.get(key)
    if isinstance(hit, dict) and hit.get("choice") in ("bf16", "fp32"):
        _memory[key] = hit["choice"]
        return hit["choice"]
    times = measure_fn()
    choice = decide(times)
    table[key] = {"choice": choice, **{f"{k}_ms": round(v, 3) for k, v in times.items()}}
    saved = write_table(path, table)
    logger.info("precision auto on CPU (%s): a %dx%dx%d matmul takes %.1f ms in fp32, %.1f ms in bf16: %s%s", name,
                *PROBE_SHAPE, times["fp32"], times["bf16"], choice, f" (cached in {path})" if saved else "")
    _memory[key] = choice
    return choice
