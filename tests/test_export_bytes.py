"""Export copies the tensors a delta leaves alone as the base's bytes (kernel copy, never decoded):
its output must equal, byte for byte, the earlier path that reads, merges and encodes every tensor
(``sparse_ft.export._BYTE_COPY = False``), for every mergeable method, with and without a dtype
change, onto a different shard layout, and through each fallback copy."""
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import sparse_ft
from sparse_ft import export as E
from sparse_ft.errors import ConfigError
from sparse_ft.methods import config_from_dict
from helpers import make_model_dir
from method_cases import CASES

MERGEABLE = [pytest.param(c, id=c.id) for c in CASES if c.mergeable and "llama" in c.archs]


def make_run(tmp_path: Path, method: dict, arch="llama", base_dtype=torch.float32, base_shard="40KB",
             prune: bool = False) -> Path:
    """A saved base (``base_shard`` shards, ``base_dtype``) and a delta with random trained values."""
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_model_dir(base_dir, arch)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with torch.no_grad():  # biases start at zero: give them values pruning can visibly zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    for f in list(base_dir.glob("model*.safetensors*")):
        f.unlink()
    model.to(base_dtype).save_pretrained(str(base_dir), max_shard_size=base_shard)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = config_from_dict(method)
    sparse_ft.apply(model, config)
    gen = torch.Generator().manual_seed(1)

    def perturb():
        with torch.no_grad():
            for _, p in sparse_ft.trainable_parameters(model):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))

    perturb()
    if prune:  # DSEE's second stage: the delta also zeroes entries of other layers (and OPT biases)
        from sparse_ft.methods.dsee import prune as P

        P.apply_pruning(model, config.compute_pruning(model))
        perturb()
    sparse_ft.save_delta(model, tmp_path / "run" / "delta.safetensors", base_model=str(base_dir))
    return tmp_path / "run"


def tensor_sums(out: Path) -> dict[str, tuple[str, str]]:
    """{key: (file, sha256 of the tensor's bytes)} over every shard of an export."""
    sums = {}
    for path in sorted(out.glob("*.safetensors")):
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for key, info in header.items():
            if key != "__metadata__":
                b, e = info["data_offsets"]
                sums[key] = (path.name, hashlib.sha256(raw[8 + n + b:8 + n + e]).hexdigest())
    return sums


def export_both(run: Path, tmp_path: Path, monkeypatch, **kw) -> tuple[Path, Path]:
    """The export through the old path (every tensor decoded), then through the byte copy."""
    monkeypatch.setattr(E, "_BYTE_COPY", False)
    old = E.export_hf(run, tmp_path / "old", **kw)
    monkeypatch.setattr(E, "_BYTE_COPY", True)
    new = E.export_hf(run, tmp_path / "new", **kw)
    return old, new


def assert_identical(old: Path, new: Path) -> None:
    old_sums, new_sums = tensor_sums(old), tensor_sums(new)
    assert old_sums and list(new_sums) == list(old_sums)
    differ = [k for k in old_sums if old_sums[k] != new_sums[k]]
    assert not differ, f"tensors differ from the old export: {differ[:5]}"
    # Same plan, so the same files: compare them whole too (headers, index, padding).
    names = sorted(p.name for p in old.iterdir() if p.name != "sparse_ft_export.json")
    assert names == sorted(p.name for p in new.iterdir() if p.name != "sparse_ft_export.json")
    for name in names:
        assert (old / name).read_bytes() == (new / name).read_bytes(), name


@pytest.fixture
def decoded(monkeypatch):
    """The keys the export reads and decodes (the rest it copies as bytes)."""
    keys = []
    items = E._ShardReader.items

    def spy(self, only=None):
        for key, tensor in items(self, only):
            keys.append(key)
            yield key, tensor

    monkeypatch.setattr(E._ShardReader, "items", spy)
    return keys


@pytest.mark.parametrize("case", MERGEABLE)
def test_same_dtype_copies_untouched_tensors_byte_identical(case, tmp_path, monkeypatch, decoded):
    run = make_run(tmp_path, case.method)
    old, new = export_both(run, tmp_path, monkeypatch, dtype="fp32", max_shard_size="40KB")
    assert_identical(old, new)
    new_decoded = set(decoded[len(tensor_sums(old)):])  # the first export decoded every tensor
    config = config_from_dict(case.method)
    tensors, _ = sparse_ft.delta.read_delta(run / "delta.safetensors")
    layers = config.delta_layer_names(tensors)
    touched = {k for k in tensor_sums(old) if config.export_touches(k, tensors, layers)}
    assert new_decoded == touched, "the byte copy read tensors the delta does not change (or skipped one it does)"
    if case.method["name"] != "full":
        assert touched and len(touched) < len(tensor_sums(old)) / 2


@pytest.mark.parametrize("arch,kind", [("llama", "unstructured"), ("opt", "structured")])
def test_dsee_pruned_delta_byte_identical(arch, kind, tmp_path, monkeypatch):
    method = {"name": "dsee", "r": 4, "alpha": 8, "n_sparse": 8, "rpca_rank": 8, "prune": kind,
              "prune_ratio": 0.4, "prune_ratio_other": 0.2, "prune_heads": 1}
    monkeypatch.setenv("SPARSE_FT_CACHE", str(tmp_path / "cache"))
    run = make_run(tmp_path, method, arch=arch, prune=True)
    assert_identical(*export_both(run, tmp_path, monkeypatch, dtype="fp32", max_shard_size="40KB"))


def test_dtype_change_decodes_every_float_tensor(tmp_path, monkeypatch, decoded):
    run = make_run(tmp_path, CASES[0].method)  # fp32 base
    old, new = export_both(run, tmp_path, monkeypatch, dtype="bf16", max_shard_size="40KB")
    assert_identical(old, new)
    n = len(tensor_sums(old))
    assert len(decoded) == 2 * n  # a dtype change keeps the decoding path for every tensor


@pytest.mark.parametrize("out_shard", ["25KB", "5GB"])
def test_other_shard_layout_than_the_base(out_shard, tmp_path, monkeypatch):
    run = make_run(tmp_path, CASES[0].method, base_dtype=torch.bfloat16, base_shard="60KB")
    base_files = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(base_files) > 1
    old, new = export_both(run, tmp_path, monkeypatch, dtype="bf16", max_shard_size=out_shard)
    assert sorted(p.name for p in new.glob("*.safetensors")) != base_files
    assert_identical(old, new)


def test_same_layout_moves_unchanged_runs_in_one_call(tmp_path, monkeypatch):
    """One base shard onto one output shard: a kernel copy per run between adapted tensors, not
    per tensor."""
    run = make_run(tmp_path, CASES[0].method, base_dtype=torch.bfloat16, base_shard="5GB")
    calls = []
    real = os.copy_file_range

    def counting(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", counting)
    old, new = export_both(run, tmp_path, monkeypatch, dtype="bf16")
    assert_identical(old, new)
    sums = tensor_sums(new)
    adapted = [k for k in sums if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(adapted) == 4 and len(sums) > 20
    assert 0 < len(calls) <= len(adapted) + 1


@pytest.mark.parametrize("refuse", ["copy_file_range", "copy_file_range+sendfile"])
def test_fallback_copies_when_the_kernel_refuses(refuse, tmp_path, monkeypatch):
    run = make_run(tmp_path, CASES[0].method)
    used = {"sendfile": 0, "pread": 0}

    def no_copy_file_range(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    real_sendfile, real_pread = os.sendfile, os.pread

    def sendfile(*args):
        used["sendfile"] += 1
        if "sendfile" in refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_sendfile(*args)

    def pread(*args):
        used["pread"] += 1
        return real_pread(*args)

    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(os, "pread", pread)
    old, new = export_both(run, tmp_path, monkeypatch, dtype="fp32", max_shard_size="40KB")
    assert_identical(old, new)
    assert used["sendfile"] >= 1
    assert (used["pread"] > 0) == ("sendfile" in refuse)


def test_other_copy_errors_are_not_swallowed(tmp_path, monkeypatch):
    run = make_run(tmp_path, CASES[0].method)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full_disk)
    with pytest.raises(OSError, match="No space left"):
        E.export_hf(run, tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_truncated_base_shard_names_the_file(tmp_path):
    run = make_run(tmp_path, CASES[0].method)
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    adapted = {f for k, f in index.items() if k.endswith(("q_proj.weight", "v_proj.weight"))}
    name = next(f for f in sorted(set(index.values())) if f not in adapted)  # only copied tensors there
    shard = tmp_path / "base" / name
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match=rf"{name} is truncated at tensor"):
        E.export_hf(run, tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists()
