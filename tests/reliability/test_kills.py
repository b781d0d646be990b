"""Kills at each step of the checkpoint commit and of the final writes (in-process: the patched
function raises a BaseException, as a signal would stop the process there; a full disk raises
ENOSPC), and one real ``kill -9`` of a training process at a random moment. After each, the
directory holds nothing half-written, ``latest`` names a checkpoint that verifies, and resuming
gives the uninterrupted run's loss curve, delta and results.json bit for bit."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fault_common import assert_same, config, no_temp_files, outcome
from sparse_ft.config import load_config
from sparse_ft.errors import RunError
from sparse_ft.training import checkpoint as ckpt
from sparse_ft.training.trainer import train


class Killed(BaseException):
    """Stands for a signal: not an Exception, so no handler in the code under test catches it."""


def _replace_raising(monkeypatch, when):
    real = os.replace

    def fake(src, dst, *a, **kw):
        if when(str(src), str(dst)):
            raise Killed(f"killed at os.replace({src}, {dst})")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", fake)


def _kill_rng_write(monkeypatch):  # DeepSpeed's files are written, this rank's RNG file is not
    real = ckpt.rng_state
    calls = {"n": 0}

    def fake():
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint
            raise Killed("killed while writing the checkpoint")
        return real()

    monkeypatch.setattr(ckpt, "rng_state", fake)


def _kill_manifest(monkeypatch):
    real = ckpt.write_manifest

    def fake(directory, *args, **kwargs):
        if directory.name == "step-000004":
            raise Killed("killed before the manifest")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_manifest", fake)


def _kill_prune(monkeypatch):
    real = ckpt.shutil.rmtree

    def fake(path, *a, **kw):
        if str(path).endswith("step-000002") and ckpt.PARTIAL not in str(path):  # pruning after step 6's commit
            raise Killed("killed while pruning")
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt.shutil, "rmtree", fake)


def _kill_final_delta(monkeypatch):
    import sparse_ft.delta as delta
    import sparse_ft.training.trainer as trainer

    real = delta.save_delta

    def fake(model, path, *a, **kw):
        if path.parent.name != "step-000008" and ".partial" not in str(path):
            raise Killed("killed while writing the final delta")
        return real(model, path, *a, **kw)

    # wherever the final write looks the function up (the module, or the trainer's own import)
    monkeypatch.setattr(delta, "save_delta", fake)
    if hasattr(trainer, "save_delta"):
        monkeypatch.setattr(trainer, "save_delta", fake)


KILL_POINTS = {
    # each step of the checkpoint commit, in order
    "checkpoint-files": _kill_rng_write,
    "manifest": _kill_manifest,
    "rename-into-place": lambda mp: _replace_raising(mp, lambda s, d: s.endswith(".partial/step-000004")),
    "latest-pointer": lambda mp: _replace_raising(mp, lambda s, d: d.endswith("latest") and "step-000004" in
                                                  open(s).read()),
    "prune": _kill_prune,
    # the final writes
    "final-delta": _kill_final_delta,
    "results-json": lambda mp: _replace_raising(mp, lambda s, d: d.endswith("results.json")),
}
FAST = {"rename-into-place", "results-json"}


@pytest.mark.parametrize("point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS])
def test_kill_then_resume_is_exact(assets, reference, tmp_path, monkeypatch, point):
    cfg = config(assets, tmp_path)
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        KILL_POINTS[point](mp)
        with pytest.raises(Killed):
            train(load_config(cfg, ["train.resume_from=latest"]))
    root = out / "checkpoints"
    latest = ckpt.read_latest(root)
    assert latest is not None and ckpt.verify(latest), latest  # what is visible is complete
    assert not (out / "results.json").exists()
    train(load_config(cfg, ["train.resume_from=latest"]))
    assert_same(outcome(out), reference["outcome"])
    assert no_temp_files(out) == []


def test_disk_full_while_checkpointing(assets, reference, tmp_path, monkeypatch):
    """ENOSPC inside a checkpoint write: a one-line RunError naming the directory, the half-written
    checkpoint removed, the previous one intact; resuming afterwards is exact."""
    cfg = config(assets, tmp_path)
    out = tmp_path / "run"
    real = ckpt.rng_state
    calls = {"n": 0}

    def full():
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real()

    with monkeypatch.context() as mp:
        mp.setattr(ckpt, "rng_state", full)
        with pytest.raises(RunError, match=r"writing checkpoint step-000004 under .*checkpoints failed \(No space "
                                           r"left on device\); the previous checkpoint .*step-000002 is intact"):
            train(load_config(cfg, ["train.resume_from=latest"]))
    root = out / "checkpoints"
    assert not (root / ckpt.PARTIAL / "step-000004").exists()
    assert ckpt.read_latest(root) == root / "step-000002"
    train(load_config(cfg, ["train.resume_from=latest"]))
    assert_same(outcome(out), reference["outcome"])


def test_disk_full_leaves_no_latest_tmp(tmp_path, monkeypatch):
    (tmp_path / "latest").write_text("step-000002")

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.Path, "write_text", full)
    with pytest.raises(OSError):
        ckpt._write_atomic(tmp_path / "latest", "step-000004")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert (tmp_path / "latest").read_text() == "step-000002"


def test_resubmitting_a_finished_run_changes_nothing(reference, tmp_path):
    """A finished job resubmitted unchanged (resume_from=latest, as sweeps and job scripts do):
    nothing retrains, results.json and the delta stay byte for byte."""
    out = reference["out"]
    before = {p: (out / p).read_bytes() for p in ("results.json", "delta.safetensors", "metrics.jsonl")}
    results = train(load_config(reference["cfg"], ["train.resume_from=latest"]))
    assert results == reference["outcome"]["results"]
    assert {p: (out / p).read_bytes() for p in before} == before


@pytest.mark.slow
def test_sigkill_at_a_random_moment(assets, reference, tmp_path):
    """A real ``kill -9`` of ``sparse-ft train`` at a random moment after training started."""
    seed = int(os.environ.get("SPARSE_FT_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    cfg = config(assets, tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "sparse_ft.cli", "train", "--config", str(cfg),
                             "train.resume_from=latest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = rng.randint(1, 7)  # kill once this many steps are logged, plus a random fraction of a step
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            time.sleep(rng.random() * 0.5)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(load_config(cfg, ["train.resume_from=latest"]))
    assert_same(outcome(out), reference["outcome"]), f"seed {seed}"
