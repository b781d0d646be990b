"""``train.precision: auto`` on CPU: the decision from injected timings, the per-machine cache."""
import json

import pytest
import torch

from sparse_ft.ops import cpu_precision as cp
from sparse_ft.training import runtime

AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512f avx512_bf16 " \
      "amx_tile amx_bf16\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
ZEN3 = "model name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu avx2 fma\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FT_CACHE", str(tmp_path))
    monkeypatch.setattr(cp, "_memory", {})
    return tmp_path


def test_decide_takes_bf16_only_when_clearly_faster():
    assert cp.decide({"fp32": 53.0, "bf16": 10.0}) == "bf16"     # a Xeon with AMX (issue 12)
    assert cp.decide({"fp32": 4.0, "bf16": 300.0}) == "fp32"     # emulated bf16 (AVX2)
    assert cp.decide({"fp32": 10.0, "bf16": 9.0}) == "fp32"      # within the margin: not worth rounding
    assert cp.decide({"fp32": 10.0, "bf16": 10.0 * cp.MARGIN}) == "bf16"


def test_identity_names_the_model_and_bf16_flags():
    name, key = cp.cpu_identity(AMX)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert "avx512_bf16" in key and "amx_bf16" in key and "fpu" not in key
    assert cp.cpu_identity(ZEN3)[1] != key


def test_measured_once_then_read_from_the_cache(cache):
    calls = []

    def fast_bf16():
        calls.append(1)
        return {"fp32": 53.0, "bf16": 10.0}

    assert cp.cpu_precision(fast_bf16, AMX) == "bf16"
    assert cp.cpu_precision(fast_bf16, AMX) == "bf16" and len(calls) == 1  # in-process memory
    files = list(cache.glob("cpu_precision_*.json"))
    assert len(files) == 1 and "Xeon" in files[0].name
    entry = json.loads(files[0].read_text())[cp.cpu_identity(AMX)[1]]
    assert entry == {"choice": "bf16", "fp32_ms": 53.0, "bf16_ms": 10.0}

    cp._memory.clear()  # a new process: the file answers, nothing is measured

    def must_not_measure():
        raise AssertionError("measured although cached")

    assert cp.cpu_precision(must_not_measure, AMX) == "bf16"
    # Another CPU (other model, other flags) is measured on its own.
    assert cp.cpu_precision(lambda: {"fp32": 4.0, "bf16": 300.0}, ZEN3) == "fp32"
    assert len(list(cache.glob("cpu_precision_*.json"))) == 2


def test_corrupt_cache_is_measured_again(cache):
    from sparse_ft.ops.cache import table_file

    name, _ = cp.cpu_identity(ZEN3)
    table_file("cpu_precision", name).write_text("{not json")
    assert cp.cpu_precision(lambda: {"fp32": 4.0, "bf16": 300.0}, ZEN3) == "fp32"
    assert json.loads(table_file("cpu_precision", name).read_text())[cp.cpu_identity(ZEN3)[1]]["choice"] == "fp32"


def test_measure_times_both_dtypes():
    times = cp.measure((32, 64, 48), reps=2)
    assert set(times) == {"fp32", "bf16"} and all(t > 0 for t in times.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule")
def test_auto_on_cpu_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(cp, "cpu_precision", lambda: "bf16")
    assert runtime.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(cp, "cpu_precision", lambda: "fp32")
    assert runtime.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(cp, "cpu_precision", lambda: pytest.fail("explicit precision must not measure"))
    assert runtime.resolve_precision("fp32") == "fp32" and runtime.resolve_precision("bf16") == "bf16"
