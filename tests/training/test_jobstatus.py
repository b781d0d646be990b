"""A failing rank ends the job on every rank, naming rank, host and error; exit_status.json; the
start-up barrier; node-local bookkeeping that must agree across nodes; missing checkpoint files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparse_ft.training.checkpoint import CheckpointFilesMissing, check_rank_files
from sparse_ft.training.jobstatus import EXIT_STATUS_FILE, read_exit_status
from sparse_ft.training.trainer import MetricsWriter

ROOT = Path(__file__).resolve().parents[2]

# Two ranks over gloo. Rank 1 fails (a ConfigError, as a bad model path on one node gives) while
# rank 0 waits in a collective with a 30-minute timeout: without the watch it would wait that long.
RANK_SCRIPT = textwrap.dedent("""
    import datetime, os, sys, time
    import torch
    from sparse_ft.errors import ConfigError
    from sparse_ft.training.jobstatus import WATCH, startup_barrier
    rank, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    WATCH.start(out + f"/node{rank}", 3.0)
    try:
        if mode == "error" and rank == 1:
            raise ConfigError("model.name_or_path: local directory /nope does not exist")
        if mode == "hang" and rank == 1:
            time.sleep(3600)  # killed, or stuck in its load: no Python error to report
        if mode == "hang":
            startup_barrier()
        torch.distributed.barrier()
    except BaseException as e:
        WATCH.failed(e)
        print(f"rank {rank} raised {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    WATCH.stop()
    WATCH.succeeded()
""")


def run_two_ranks(tmp_path, mode: str) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path), mode], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)  # far below the 1800 s collective timeout
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{mode}: a rank was still waiting after 240 s: the failure did not end the job")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_failing_rank_ends_the_others_with_its_error(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, "error")
    assert rank1.returncode == 2
    assert rank0.returncode == 2, rank0.stderr[-3000:]  # the failing rank's code, not a timeout's
    host = socket.gethostname()
    assert (f"rank 1 on host {host} failed: sparse_ft.errors.ConfigError: model.name_or_path: local directory "
            f"/nope does not exist; stopping rank 0 on host {host}") in rank0.stderr
    for node in (0, 1):  # local rank 0 of every node records it
        record = read_exit_status(tmp_path / f"node{node}" / EXIT_STATUS_FILE)
        assert record is not None and (record["exit_code"], record["rank"], record["host"]) == (2, 1, host)


def test_startup_barrier_names_the_rank_that_never_arrives(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, "hang")
    assert rank0.returncode == 1
    assert "start-up barrier after loading the model: rank 1 on host" in rank0.stderr, rank0.stderr[-3000:]
    assert "train.startup_timeout_s = 3" in rank0.stderr
    assert rank1.returncode == 1 and "stopping rank 1" in rank1.stderr  # told by rank 0's failure


def test_success_writes_exit_code_0(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, "ok")
    assert (rank0.returncode, rank1.returncode) == (0, 0), rank0.stderr[-2000:] + rank1.stderr[-2000:]
    assert json.loads((tmp_path / "node0" / EXIT_STATUS_FILE).read_text()) == {"exit_code": 0}


def test_metrics_rows_agree_on_ranks_that_do_not_write(tmp_path):
    """trainer_state.json's metrics_rows comes from every node's local rank 0 under node-local
    checkpoints: a non-writing rank must count from the resumed row count as rank 0 does."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 4)))
    writer, silent = MetricsWriter(path, True), MetricsWriter(tmp_path / "other.jsonl", False)
    for w in (writer, silent):
        w.open(keep_rows=2)
        w.write({"step": 3})
        w.write({"step": 4})
        w.close()
    assert writer.rows == silent.rows == 4
    assert not (tmp_path / "other.jsonl").exists()


def test_resume_names_the_rank_whose_files_are_missing(tmp_path):
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    for r in (2, 3):  # the other node's shards
        (ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    check_rank_files(ckpt, 2)
    with pytest.raises(CheckpointFilesMissing) as info:
        check_rank_files(ckpt, 0)
    message = str(info.value)
    assert f"resume from {ckpt}: rank 0 on host {socket.gethostname()} finds no *zero_pp_rank_0_*" in message
    assert "this directory holds ranks 2, 3" in message and "node that wrote its files" in message
