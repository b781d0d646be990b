"""A multi-node job ends as one: a rank that fails tells every other rank, which stop within
seconds, and the job's outcome is written to ``exit_status.json`` in the run directory.

Why: a rank that raises (a bad model path on one node, a corrupt shard, an OOM in Python) exits;
the others sit in their next collective until the collective timeout (30 minutes by default),
and torchrun and SLURM turn every exit code into 1. Here:

- every rank, right after the process group exists, publishes its host name in the job's
  rendezvous store and starts a watcher thread that polls the store once a second;
- a rank that fails writes ``{rank, host, error, exit_code}`` under :data:`FAILED_KEY` before it
  exits; every watcher that sees it prints one line naming that rank, host and error and ends its
  own process with the same exit code; a watcher that loses the store (it lives in rank 0's
  process, or the torchrun agent of node 0) ends its process too;
- after the model is loaded, :func:`startup_barrier` waits at most ``train.startup_timeout_s`` for
  every rank (a rank killed outright, with no Python error to report, is named there);
- local rank 0 of every node writes :data:`EXIT_STATUS_FILE` in the run directory: exit code 0 at
  the end, 2 (bad input), 3 (diverged) or 1 (any other error) with the failing rank's record.
  The launchers in ``sparse_ft.launch`` return the code from that file. Until a run holds its run
  directory (a rank ended by another rank's failure while still starting), the record goes only to
  the file the launcher names in :data:`LAUNCH_STATUS_ENV`, so a run refused in a directory never
  replaces the status of the run that owns it.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from ..errors import ConfigError
from .guard import EXIT_DIVERGED
from .runtime import init_distributed

EXIT_STATUS_FILE = "exit_status.json"
"""In ``train.output_dir``: ``{"exit_code": N, "rank": R, "host": H, "error": "..."}`` (rank, host
and error only when the run failed). Written by local rank 0 of each node."""
LAUNCH_STATUS_ENV = "SPARSE_FT_LAUNCH_STATUS"
"""Set by the launchers in ``sparse_ft.launch`` to a file of their own (not in the run directory): local
rank 0 writes every outcome there too, so the launcher on each node gets the job's exit code even when
its ranks ended before taking the run directory."""
EXIT_BAD_INPUT = 2
EXIT_ERROR = 1
FAILED_KEY = "sparse_ft/failed"
HOST_KEY = "sparse_ft/host/{rank}"
POLL_S = 1.0


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, ConfigError):
        return EXIT_BAD_INPUT
    return getattr(error, "exit_code", EXIT_ERROR)


def write_exit_status(output_dir: str | os.PathLike, record: dict) -> None:
    """``output_dir/exit_status.json``, atomically (temp file + rename): a reader never sees half a record."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        return  # output_dir is a file: the error being reported says so; nowhere to write the status
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # never mask the error being reported
        print(f"sparse-ft: could not write {out / EXIT_STATUS_FILE}: {e}", file=sys.stderr)
        return
    write_status_file(out / EXIT_STATUS_FILE, record)


def write_status_file(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # never mask the error being reported
        print(f"sparse-ft: could not write {path}: {e}", file=sys.stderr)


def write_launch_status(record: dict) -> None:
    """The record to the launcher's own status file, when a sparse-ft launcher named one."""
    path = os.environ.get(LAUNCH_STATUS_ENV)
    if path:
        write_status_file(path, record)


def read_exit_status(path: str | os.PathLike, newer_than: float = 0.0) -> dict | None:
    """The record in ``path`` if it exists, parses and was written after ``newer_than`` (epoch s)."""
    path = Path(path)
    try:
        if path.stat().st_mtime < newer_than:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("exit_code"), int) else None


def failure_message(record: dict) -> str:
    return f"rank {record.get('rank')} on host {record.get('host')} failed: {record.get('error')}"


class JobWatch:
    """One per process (see the module docstring). Inert in a one-process run."""

    def __init__(self) -> None:
        self.store = None
        self.rank = 0
        self.local_rank = 0
        self.world = 1
        self.output_dir: str | None = None
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported = False
        self.barrier_group = None
        self.barrier_timeout_s = 300.0

    # -- set-up ----------------------------------------------------------------------------------
    def start(self, output_dir: str | os.PathLike | None, barrier_timeout_s: float = 300.0) -> None:
        """Call right after the process group exists, on every rank (it creates the start-up
        barrier's group: a collective every rank reaches here)."""
        self.output_dir = None if output_dir is None else str(output_dir)
        self.barrier_group, self.barrier_timeout_s = None, barrier_timeout_s
        self._stop, self._reported, self._thread = threading.Event(), False, None
        if not torch.distributed.is_initialized():
            return
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.world == 1:
            return
        try:
            self.store = torch.distributed.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):  # a torch without it: no watch, nothing else changes
            self.store = None
            return
        self.store.set(HOST_KEY.format(rank=self.rank), self.host)
        # gloo whatever the backend: monitored_barrier exists only there.
        self.barrier_group = torch.distributed.new_group(backend="gloo",
                                                         timeout=datetime.timedelta(seconds=barrier_timeout_s))
        if self.local_rank == 0 and self.output_dir is not None:
            # A status file from an earlier attempt in this directory must not describe this one.
            Path(self.output_dir, EXIT_STATUS_FILE).unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._watch, name="sparse-ft-job-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Before the last collective of a run that succeeded: from here on a rank that exits
        early (rank 0 holds the store) is normal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def host_of(self, rank: int) -> str:
        if self.store is None:
            return "?"
        try:
            if self.store.check([HOST_KEY.format(rank=rank)]):
                return self.store.get(HOST_KEY.format(rank=rank)).decode()
        except Exception:  # noqa: BLE001 - a lost store only costs the host name here
            pass
        return "?"

    def attach(self, output_dir: str | os.PathLike) -> None:
        """From here on outcomes go to ``output_dir/exit_status.json``. The trainer calls it once
        this process holds the run directory's lock and the directory is not a finished run: a
        second run refused there must not replace (or delete) the status of the run that owns it."""
        self.output_dir = str(output_dir)
        if self.local_rank == 0:
            Path(self.output_dir, EXIT_STATUS_FILE).unlink(missing_ok=True)

    # -- outcomes --------------------------------------------------------------------------------
    def succeeded(self) -> None:
        self._record({"exit_code": 0})

    def diverged(self) -> None:
        self._record({"exit_code": EXIT_DIVERGED})

    def _record(self, record: dict) -> None:
        """Local rank 0 (of every node) writes the outcome: to the run directory once this run holds
        it, and always to the launcher's own file."""
        if self.local_rank == 0 or self.world == 1:
            write_launch_status(record)
            if self.output_dir is not None:
                write_exit_status(self.output_dir, record)

    def failed(self, error: BaseException) -> dict:
        """Tell every rank that this one failed with ``error``; returns the record."""
        self._stop.set()
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        record = {"exit_code": exit_code_for(error), "rank": self.rank, "host": self.host, "error": text}
        first = None
        if self.store is not None and not self._reported:
            self._reported = True
            try:
                # add() is atomic: only the first failure's record is kept.
                if self.store.add(FAILED_KEY + "/count", 1) == 1:
                    self.store.set(FAILED_KEY, json.dumps(record))
                else:
                    # Another rank failed first; this error (a broken connection to it, mostly)
                    # is its consequence. Report and exit as the first failure.
                    self.store.wait([FAILED_KEY], datetime.timedelta(seconds=10))
                    first = json.loads(self.store.get(FAILED_KEY))
            except Exception:  # noqa: BLE001 - the store may be gone with rank 0; still exit
                pass
        if first is not None and first.get("rank") != self.rank:
            self._end(first)
        self._record(record)
        return record

    # -- the watcher thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        misses = 0
        while not self._stop.wait(POLL_S):
            try:
                if not self.store.check([FAILED_KEY]):
                    misses = 0
                    continue
                record = json.loads(self.store.get(FAILED_KEY))
            except Exception as e:  # noqa: BLE001
                misses += 1
                if misses < 3 or self._stop.is_set():  # a blip, or a normal end racing the check
                    continue
                record = {"exit_code": EXIT_ERROR, "rank": 0, "host": self.host_of(0),
                          "error": f"the job's rendezvous store went away ({type(e).__name__}: {e}); "
                                   "the process holding it (rank 0 or node 0's launcher) has ended"}
            if self._stop.is_set():
                return
            self._end(record)

    def _end(self, record: dict) -> None:
        print(f"sparse-ft: {failure_message(record)}; stopping rank {self.rank} on host {self.host}",
              file=sys.stderr, flush=True)
        self._record(record)
        os._exit(int(record.get("exit_code") or EXIT_ERROR))


WATCH = JobWatch()


def report_before_start(error: BaseException, output_dir: str | os.PathLike | None,
                        timeout_s: float = 120.0) -> None:
    """A rank that fails before the process group exists (its config does not load) still joins
    it, briefly, to tell the others; otherwise they would wait for it until the timeout."""
    if torch.distributed.is_initialized() or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return
    try:
        init_distributed(timeout_s)
    except Exception as e:  # noqa: BLE001 - report what we can, keep the original error
        print(f"sparse-ft: could not reach the other ranks to report the error: {e}", file=sys.stderr)
        return
    WATCH.start(output_dir)
    WATCH.failed(error)


def startup_barrier(what: str = "loading the model") -> None:
    """Every rank must arrive within ``train.startup_timeout_s`` (given to :meth:`JobWatch.start`)
    of the first; otherwise fail naming the ranks (and hosts) that did not."""
    group, timeout_s = WATCH.barrier_group, WATCH.barrier_timeout_s
    if group is None:
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    t0 = time.monotonic()
    try:
        torch.distributed.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as e:
        missing = _ranks_in(str(e))
        named = ", ".join(f"rank {r} on host {WATCH.host_of(r)}" for r in missing) or str(e).splitlines()[0]
        raise RuntimeError(f"start-up barrier after {what}: {named} did not arrive within "
                           f"{time.monotonic() - t0:.0f} s (train.startup_timeout_s = {timeout_s:g})") from None


def _ranks_in(message: str) -> list[int]:
    """Rank numbers from monitored_barrier's 'Ranks 1, 3 failed to pass monitoredBarrier' text."""
    match = re.search(r"Ranks? ([\d, ]+) failed to pass", message)
    return [int(r) for r in match.group(1).replace(" ", "").split(",") if r] if match else []
