"""A run directory belongs to one run: an exclusive lock while a run writes there, a check that a
resumed run has the config that made its checkpoint, and no retraining over a finished run.

The lock is ``<output_dir>/.sparse_ft.lock``, held with ``fcntl.flock`` on an open descriptor by the
writing process (rank 0), so the kernel releases it when that process exits in any way, ``kill -9``
included; the file records pid, host and start time so a second run can name the holder. A lock
file whose recorded process is gone is stale: the next run takes it over and says whose it was.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger("sparse_ft")

LOCK_FILE = ".sparse_ft.lock"

# Keys that may differ between a checkpoint's config and the config resuming it: the step budget,
# how often to evaluate/log/save, and where things go. Anything else (rates, method, data, model,
# DeepSpeed) changes what the checkpoint means, so resuming with it would mix two runs.
RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.max_steps", "train.stop_after_steps", "train.resume_from",
    "train.overwrite_output_dir", "train.eval_every", "train.eval_before", "train.eval_batch_size",
    "train.log_every", "train.save_every", "train.keep_last", "train.checkpoint_dir", "train.output_dir",
    "train.max_bad_steps", "train.save_delta",
})
# A finished run is the same run only when nothing but these differs.
FINISHED_MAY_CHANGE = frozenset({"train.resume_from", "train.stop_after_steps", "train.overwrite_output_dir",
                                 "train.output_dir", "train.checkpoint_dir"})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def check_writable_dir(path: Path, field: str) -> None:
    """``path`` is (or can be made) a writable directory; else a one-line ConfigError naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field} = {str(path)!r} is a file; allowed: a directory (new or existing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field} = {str(path)!r}: a parent of it is a file; allowed: a directory path") from None
    except OSError as e:
        raise ConfigError(f"{field} = {str(path)!r} cannot be created ({e.strerror}); choose a writable "
                          "directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{field} = {str(path)!r} is not writable (permission denied); choose a writable "
                          "directory")


class RunLock:
    """Exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.fd: int | None = None

    def read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        import fcntl

        check_writable_dir(self.directory, "train.output_dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.read_holder()
            raise ConfigError(f"train.output_dir = {str(self.directory)!r} is in use by another run "
                              f"({_describe(holder)}; lock {self.path}); wait for it to end or choose another "
                              "output_dir") from None
        previous = self.read_holder()
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _pid_alive(previous["pid"]):
            logger.warning("%s: stale lock of a run that is gone (%s); taking it over", self.path, _describe(previous))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds it
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


# -- is this the same run? ------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name.count(".") == 0:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def normalised(tree: dict) -> dict:
    """A config dict as JSON would give it back (tuples as lists), flattened to ``section.key``,
    without where checkpoints are stored (see :func:`_without_storage_choice`)."""
    return flatten(_without_storage_choice(json.loads(json.dumps(tree, default=str))))


def _without_storage_choice(tree: dict) -> dict:
    """DeepSpeed's ``checkpoint.use_node_local_storage`` says where checkpoints are written (each
    node's disk or a shared one), not what they hold: a node-local checkpoint merged into one
    directory resumes with it off (docs/multi-node.md), so it may change on resume."""
    overrides = (tree.get("deepspeed") or {}).get("overrides")
    if isinstance(overrides, dict) and isinstance(overrides.get("checkpoint"), dict):
        checkpoint = {k: v for k, v in overrides["checkpoint"].items() if k != "use_node_local_storage"}
        overrides = {k: v for k, v in overrides.items() if k != "checkpoint"}
        if checkpoint:
            overrides["checkpoint"] = checkpoint
        tree = {**tree, "deepspeed": {**tree["deepspeed"], "overrides": overrides}}
    return tree


def config_diff(old: dict, new: dict, may_change: frozenset) -> list[str]:
    """``section.key`` names whose values differ, outside ``may_change``."""
    a, b = normalised(old), normalised(new)
    return sorted(k for k in set(a) | set(b) if k not in may_change and a.get(k, "<unset>") != b.get(k, "<unset>"))


def describe_diff(old: dict, new: dict, keys: list[str], limit: int = 6) -> str:
    a, b = normalised(old), normalised(new)
    shown = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def read_run_config(output_dir: Path) -> dict | None:
    """The config the last run in ``output_dir`` started with (``run_config.yaml``), if readable."""
    import yaml

    path = Path(output_dir) / "run_config.yaml"
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return tree if isinstance(tree, dict) else None


def check_resume_config(saved: dict | None, current: dict, checkpoint: Path, diverged: bool = False) -> None:
    """Resuming ``checkpoint`` (made with ``saved``) with ``current``: only RESUME_MAY_CHANGE may differ,
    and ``train.lr`` too after a divergence (the guard's advice is to resume with a lower rate)."""
    may_change = RESUME_MAY_CHANGE | {"train.lr"} if diverged else RESUME_MAY_CHANGE
    if saved is None:
        logger.warning("%s records no config (written by an older sparse-ft): cannot check that this config made it",
                       checkpoint)
        return
    keys = config_diff(saved, current, may_change)
    if keys:
        raise ConfigError(f"train.resume_from: checkpoint {checkpoint} was made with another config ("
                          f"{describe_diff(saved, current, keys)}); only the step budget, eval/save/log cadence and "
                          "paths may change on resume. Resume with the checkpoint's values, or start afresh in "
                          "another output_dir (or pass train.overwrite_output_dir=true)")


def finished_results(output_dir: Path) -> dict | None:
    path = Path(output_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_finished(output_dir: Path, current: dict) -> dict | None:
    """A run that finished in ``output_dir`` (``results.json``) is never trained over. Resubmitting it
    unchanged returns its results (nothing runs); any other config is refused naming what differs."""
    results = finished_results(output_dir)
    if results is None and not (Path(output_dir) / "results.json").exists():
        return None
    saved = read_run_config(output_dir)
    keys = config_diff(saved, current, FINISHED_MAY_CHANGE) if saved is not None else ["run_config.yaml unreadable"]
    if results is None or keys:
        what = (f" (its config differs: {describe_diff(saved, current, keys)})" if saved is not None and keys else "")
        raise ConfigError(f"train.output_dir = {str(output_dir)!r}: this run finished{what}; choose another "
                          "output_dir or pass train.overwrite_output_dir=true")
    return results
