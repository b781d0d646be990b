"""A run directory belongs to one run: two runs in one directory, stale locks, resuming with another
config, retraining over a finished run; and a stale torch-extension build lock at start-up."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fault_common import assert_same, config, outcome, run_tree, unfinished_copy
from helpers import write_yaml
from sparse_ft.cli import main
from sparse_ft.config import load_config
from sparse_ft.errors import ConfigError, RunError
from sparse_ft.training import checkpoint as ckpt
from sparse_ft.training.rundir import LOCK_FILE, RESUME_MAY_CHANGE, RunLock, config_diff
from sparse_ft.training.trainer import train

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def hold_lock(directory, then="sleep"):
    """A child process that takes the run lock of ``directory``, prints ready, then sleeps or dies."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from sparse_ft.training.rundir import RunLock
        RunLock({str(directory)!r}).acquire()
        print("ready", flush=True)
        if {then!r} == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready" or then == "die"
    return proc


@pytest.fixture()
def no_model_load(monkeypatch):
    import sparse_ft.training.trainer as trainer

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer, "load_model", refuse)


def test_second_run_fails_at_once_naming_holder(assets, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        cfg = config(assets, tmp_path)
        capsys.readouterr()
        assert main(["train", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_run_is_named_and_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    dead = hold_lock(out, then="die")
    dead.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == dead.pid  # the record survives the kill
    lock = RunLock(out)
    with caplog.at_level(logging.WARNING, logger="sparse_ft"):
        lock.acquire()
    assert f"stale lock of a run that is gone (pid {dead.pid} on host" in caplog.text
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / LOCK_FILE).read_text() == ""  # released: nobody named as holder


@pytest.mark.slow
def test_two_real_runs_in_one_dir(assets, reference, tmp_path, capsys):
    """``sparse-ft train`` twice at once in one directory: the second stops at once naming the
    first, which finishes exactly as an undisturbed run."""
    cfg = config(assets, tmp_path)
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "sparse_ft.cli", "train", "--config", str(cfg)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / LOCK_FILE).is_file() and str(first.pid) in (out / LOCK_FILE).read_text():
            break
        time.sleep(0.05)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"pid {first.pid}" in capsys.readouterr().err
    assert first.wait(timeout=300) == 0
    assert_same(outcome(out), reference["outcome"])



def test_resume_with_another_config_lists_the_keys(assets, reference, tmp_path, no_model_load):
    out = unfinished_copy(reference, tmp_path)
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(assets, out))
    with pytest.raises(ConfigError, match=r"checkpoint .*step-000008 was made with another config \(method.density: "
                                          r"0.05 -> 0.1; train.lr: 0.05 -> 0.001\)"):
        train(load_config(cfg, ["train.resume_from=latest", "method.density=0.1", "train.lr=0.001"]))


def test_may_change_on_resume():
    old = {"train": {"epochs": 2, "max_steps": 8, "log_every": 1, "lr": 0.1}, "method": {"density": 0.1}}
    new = {"train": {"epochs": 3, "max_steps": 16, "log_every": 5, "lr": 0.1}, "method": {"density": 0.1}}
    assert config_diff(old, new, RESUME_MAY_CHANGE) == []
    assert config_diff(old, {**new, "method": {"density": 0.2}}, RESUME_MAY_CHANGE) == ["method.density"]
    # Where checkpoints are stored may change (a merged node-local checkpoint resumes on shared
    # storage); the rest of DeepSpeed's overrides may not.
    node_local = {"config": "zero2", "overrides": {"checkpoint": {"use_node_local_storage": True}, "gradient_clipping": 1.0}}
    shared = {"config": "zero2", "overrides": {"gradient_clipping": 1.0}}
    assert config_diff({**old, "deepspeed": node_local}, {**old, "deepspeed": shared}, RESUME_MAY_CHANGE) == []
    assert config_diff({**old, "deepspeed": node_local}, {**old, "deepspeed": {"config": "zero2", "overrides": {}}},
                       RESUME_MAY_CHANGE) == ["deepspeed.overrides"]


def test_finished_run_is_never_trained_over(assets, reference, tmp_path, no_model_load):
    out = shutil.copytree(reference["out"], tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(assets, out))
    with pytest.raises(ConfigError, match=r"this run finished \(its config differs: train.lr: 0.05 -> 0.001\); "
                                          r"choose another output_dir or pass train.overwrite_output_dir=true"):
        train(load_config(cfg, ["train.resume_from=latest", "train.lr=0.001"]))
    with pytest.raises(ConfigError, match=r"this run finished \(its config differs: train.max_steps: 8 -> 60\)"):
        train(load_config(cfg, ["train.resume_from=latest", "train.max_steps=60"]))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load_config(cfg, ["train.lr=0.001"]))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_starts_afresh_without_old_checkpoints(assets, reference, tmp_path):
    out = shutil.copytree(reference["out"], tmp_path / "run")
    cfg = write_yaml(tmp_path / "run.yaml", run_tree(assets, out, lr=0.02))
    results = train(load_config(cfg, ["train.resume_from=latest", "train.overwrite_output_dir=true"]))
    assert results["train_loss"] != reference["outcome"]["results"]["train_loss"]
    for tag in ckpt.list_checkpoints(out / "checkpoints"):  # every checkpoint is this run's
        assert json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())["run_config"]["train"][
            "lr"] == 0.02


# -- torch extension build locks -----------------------------------------------------------------
def _lock(root, age_s):
    lock = root / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_stale_extension_lock_detected(tmp_path, monkeypatch):
    from sparse_ft.training.runtime import check_extension_locks, stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, 600)
    assert stale_extension_locks() == [lock]
    with pytest.raises(RunError, match=rf"stale torch extension build lock {lock}: .* remove it \(rm {lock}\)"):
        check_extension_locks()
    fd = os.open(lock, os.O_RDONLY)  # a live process holding it (a build in progress): not stale
    try:
        assert stale_extension_locks() == []
    finally:
        os.close(fd)
    os.utime(lock)  # just created by a build starting now: not stale either
    assert stale_extension_locks() == []


def test_stale_extension_lock_stops_train_with_one_line(assets, tmp_path):
    """In a fresh process (where DeepSpeed would wait for the lock forever): exit 1, one line."""
    lock = _lock(tmp_path / "ext", 600)
    cfg = config(assets, tmp_path)
    env = dict(ENV, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-m", "sparse_ft.cli", "train", "--config", str(cfg)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"sparse-ft train: error: stale torch extension build "
                                                           f"lock {lock}")
