"""Each artifact kind damaged (bits flipped, truncated, removed): loading names the file (and the
tensor), resume falls back to the newest checkpoint that verifies and says so, and a delta with
corrupt or non-finite values is never applied or exported."""
import json
import logging
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault_common import assert_same, outcome, run_tree, unfinished_copy
from helpers import write_yaml
from sparse_ft.config import load_config
from sparse_ft.delta import FORMAT, read_delta, tensor_sha256
from sparse_ft.errors import ConfigError
from sparse_ft.training import checkpoint as ckpt
from sparse_ft.training.trainer import train


def flip(path, offset, mask=0xFF):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def tensor_span(path, key):
    """Byte range of tensor ``key`` in a safetensors file (from its header)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    begin, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def largest(directory, suffix):
    return max((p for p in directory.iterdir() if p.name.endswith(suffix)), key=lambda p: p.stat().st_size)


DAMAGE = {
    "model-states-bits": lambda d: flip(largest(d, ".pt"), largest(d, ".pt").stat().st_size // 2),
    "model-states-truncated": lambda d: truncate(largest(d, ".pt")),
    "trainer-state-truncated": lambda d: truncate(d / "trainer_state.json"),
    "rng-truncated": lambda d: truncate(d / "rng_rank0.pt"),
    "delta-bits": lambda d: flip(d / "delta.safetensors", (d / "delta.safetensors").stat().st_size - 3),
    "manifest-removed": lambda d: (d / ckpt.MANIFEST).unlink(),
    "file-removed": lambda d: (d / "rng_rank0.pt").unlink(),
}
NAMED = {"model-states-bits": ".pt", "model-states-truncated": ".pt", "trainer-state-truncated": "trainer_state.json",
         "rng-truncated": "rng_rank0.pt", "delta-bits": "delta.safetensors", "manifest-removed": ckpt.MANIFEST,
         "file-removed": "rng_rank0.pt"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_names_the_damaged_file(reference, tmp_path, kind):
    src = ckpt.read_latest(reference["out"] / "checkpoints")
    assert ckpt.verify(src)
    damaged = shutil.copytree(src, tmp_path / src.name)
    DAMAGE[kind](damaged)
    with pytest.raises(ckpt.CorruptCheckpoint) as err:
        ckpt.verify(damaged)
    assert err.value.path.name.endswith(NAMED[kind]) and str(damaged) in str(err.value)



def test_resume_falls_back_to_newest_intact(assets, reference, tmp_path, caplog):
    out = unfinished_copy(reference, tmp_path)
    root = out / "checkpoints"
    assert ckpt.list_checkpoints(root) == ["step-000006", "step-000008"]
    bad = largest(root / "step-000008", ".pt")
    flip(bad, bad.stat().st_size // 2)
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(assets, out))
    with caplog.at_level(logging.WARNING, logger="sparse_ft"):
        train(load_config(cfg, ["train.resume_from=latest"]))
    log = caplog.text
    assert f"{bad.name}: content differs from its sha256" in log and "step-000006, the newest checkpoint that verifies" in log
    assert list((root / ckpt.CORRUPT).iterdir())[0].name.startswith("step-000008")  # kept aside, not deleted
    assert_same(outcome(out), reference["outcome"])  # steps 7-8 retrained: the same bits


def test_no_intact_checkpoint_is_one_line_exit_1(assets, reference, tmp_path, capsys):
    from sparse_ft.cli import main

    out = unfinished_copy(reference, tmp_path)
    for tag in ckpt.list_checkpoints(out / "checkpoints"):
        truncate(out / "checkpoints" / tag / "trainer_state.json")
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(assets, out))
    assert main(["train", "--config", str(cfg), "train.resume_from=latest"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sparse-ft train: error: no intact checkpoint in ") and "trainer_state.json" in err[-1]


def test_explicit_resume_from_corrupt_checkpoint_names_it(assets, reference, tmp_path):
    out = unfinished_copy(reference, tmp_path)
    target = out / "checkpoints" / "step-000006"
    truncate(target / "rng_rank0.pt")
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(assets, out))
    from sparse_ft.errors import RunError

    with pytest.raises(RunError, match=r"checkpoint .*step-000006 is corrupt \(.*rng_rank0.pt: \d+ bytes, the "
                                       r"manifest says \d+ \(truncated"):
        train(load_config(cfg, [f"train.resume_from={target}"]))


# -- the delta --------------------------------------------------------------------------------------
@pytest.fixture()
def delta(reference, tmp_path):
    path = tmp_path / "delta.safetensors"
    shutil.copy(reference["out"] / "delta.safetensors", path)
    return path


def _values_key(path):
    return next(k for k in load_file(str(path)) if k.endswith("values"))


def _indices_key(path):
    return next(k for k in load_file(str(path)) if not load_file(str(path))[k].is_floating_point())


def test_delta_exponent_bits_flipped(delta):
    key = _values_key(delta)
    begin, _ = tensor_span(delta, key)
    flip(delta, begin + 3, 0x7F)  # the high byte of the first fp32 value: sign kept, exponent bits set
    with pytest.raises(ConfigError, match=rf"{delta} is corrupt: tensor {key} does not match its checksum"):
        read_delta(delta)


def test_delta_index_byte_flipped_in_range(delta):
    key = _indices_key(delta)
    begin, _ = tensor_span(delta, key)
    flip(delta, begin, 0x01)  # still a valid position, the wrong one
    with pytest.raises(ConfigError, match=rf"tensor {key} does not match its checksum"):
        read_delta(delta)


def test_delta_truncated(delta):
    truncate(delta, 0.7)
    with pytest.raises(ConfigError, match=rf"delta file {delta} is truncated or not a safetensors file"):
        read_delta(delta)


def test_delta_with_nan_refused_on_load_and_export(delta, reference, tmp_path, capsys):
    """NaN values with a valid checksum (a run that wrote NaN): load_delta and export refuse them
    naming the tensor; export creates nothing."""
    from safetensors import safe_open

    from helpers import tiny_model
    from sparse_ft import load_delta
    from sparse_ft.cli import main

    with safe_open(str(delta), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = _values_key(delta)
    tensors[key][0] = float("nan")
    meta["tensor_sha256"] = json.dumps({k: tensor_sha256(v) for k, v in tensors.items()})
    assert meta["format"] == FORMAT
    save_file(tensors, str(delta), metadata=meta)
    with pytest.raises(ConfigError, match=rf"tensor {key} holds NaN or inf values"):
        load_delta(tiny_model("llama"), delta)
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(delta), "--out", str(out)]) == 2
    assert f"tensor {key} holds NaN or inf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]  # no out, no staging


def test_corrupt_delta_export_exit_2_creates_nothing(delta, tmp_path, capsys):
    from sparse_ft.cli import main

    begin, _ = tensor_span(delta, _values_key(delta))
    flip(delta, begin + 3, 0x7F)
    assert main(["export", "--checkpoint", str(delta), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its checksum" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]


def test_old_delta_without_checksums_still_loads(delta, tmp_path):
    from safetensors import safe_open

    with safe_open(str(delta), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "tensor_sha256"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(delta), metadata=meta)
    got, _ = read_delta(delta)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
