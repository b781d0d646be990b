import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (DSEE's Omega files, the SDDMM crossover table) go to a temporary directory, not
    ~/.cache; launched subprocesses inherit it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SPARSE_FT_CACHE", str(tmp_path_factory.mktemp("sparse_ft_cache")))
    yield
    patch.undo()


@pytest.fixture(params=["standard", "avx512bf16"])
def bnb_cpu_path(request, monkeypatch):
    """Which of bitsandbytes' two CPU paths a ``Linear4bit`` built during the test takes on its own,
    whatever this CPU is: ``standard`` (dequantize, one matmul in the compute dtype: every CPU, and
    training) or ``avx512bf16`` (eval-mode forwards repack the weight in place for a native bf16
    kernel: CPUs with AVX512-BF16/AMX). bitsandbytes reads its CPU detection when a layer is built
    (``Linear4bit.support_avx512bf16_for_cpu``), so patching the detection forces either path; the
    tests then check that sparse-ft computes the same on both (``sparse_ft.quant.keep_standard_4bit_layout``)."""
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    if not hasattr(modules, "has_avx512bf16"):
        if request.param != "standard":
            pytest.skip("this bitsandbytes has a single CPU path for 4-bit layers")
        return request.param
    forced = request.param == "avx512bf16"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: forced)
    return request.param


@pytest.fixture(autouse=True)
def _no_zero3_config_left_live():
    """Each test starts without a ZeRO-3 config live in transformers: a one-process ZeRO-3 run keeps
    its HfDeepSpeedConfig alive (sparse_ft.training.model._live_hf_ds_configs) for as long as its model
    is used, and models that later tests build in-line would otherwise be partitioned as they are made."""
    yield
    from sparse_ft.training import model as model_module

    model_module._live_hf_ds_configs.clear()
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        return
    hf_ds._hf_deepspeed_config_weak_ref = None
