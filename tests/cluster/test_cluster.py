"""The real launchers on a two-node cluster on this machine (scripts/local_cluster.sh): node1 =
127.0.0.1 and node2 = 127.0.0.3, each with its own host name and disk; sshd + pdsh for the
deepspeed launcher, slurmctld + two slurmd for SLURM. Every training run here must give exactly
the delta of the same run as one node with two processes (same world size, same data order).

Wall time on a 2-core machine: 5.4 minutes for the module, cluster start and stop included
(measured; tiny LLaMA, 4 steps, ZeRO-2 so that each rank has its own shard files).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import base_run_tree, free_port, make_model_dir, make_sentiment_data, write_yaml

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NODES = {"node1": "127.0.0.1", "node2": "127.0.0.3"}


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory):
    """Model, data and config on the shared filesystem, and the 1-node 2-process reference run."""
    tmp = tmp_path_factory.mktemp("cluster")
    model = make_model_dir(tmp / "llama", "llama")
    data = make_sentiment_data(tmp / "data", 48, 16)
    tree = base_run_tree(model, data, tmp / "unused", epochs=1, micro_batch_size=4, save_every=2, lr=5e-2)
    tree["task"].update(num_train=32, num_test=0)  # 4 steps at world size 2
    tree["deepspeed"] = {"config": "zero2"}  # per-rank shard files, so a rank on the wrong node is caught
    config = write_yaml(tmp / "run.yaml", tree)
    ref = tmp / "ref"
    run([sys.executable, "launch/torchrun.py", "--nproc-per-node", "2", "--config", str(config),
         f"train.output_dir={ref}"], cluster.env())
    # Node-local directories outlive pytest's temporary ones: a tag no earlier session used.
    tag = f"{os.getpid()}-{int(time.time())}"
    return {"tmp": tmp, "config": config, "ref": ref, "tag": tag, "cluster": cluster}


def run(command, env, timeout=420, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, command))} exited {result.returncode}:\n"
                             f"{(result.stdout + result.stderr)[-5000:]}")
    return result


def on_node(node: str, command: list[str], env: dict[str, str]) -> list[str]:
    """``command`` run on ``node`` over ssh, from the repository, with the Python environment."""
    remote_env = {k: env[k] for k in ("PYTHONPATH", "GLOO_SOCKET_IFNAME", "SPARSE_FT_CACHE") if k in env}
    remote_env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    line = f"cd {shlex.quote(str(ROOT))} && env {' '.join(f'{k}={shlex.quote(v)}' for k, v in remote_env.items())} " \
           + shlex.join(map(str, command))
    return ["ssh", NODES[node], line]


def torchrun_two_nodes(setup, out: str, *overrides: str, nodes=("node1", "node2"), node2_overrides=()):
    """launch/torchrun.py on both nodes at once (node rank 0 on nodes[0]); returns both results."""
    cluster, port = setup["cluster"], free_port()
    env = cluster.env()
    procs = []
    for rank, node in enumerate(nodes):
        extra = list(node2_overrides) if node == "node2" else []
        command = [sys.executable, "launch/torchrun.py", "--nnodes", "2", "--node-rank", str(rank),
                   "--master-addr", NODES[nodes[0]], "--master-port", str(port), "--nproc-per-node", "1",
                   "--node-local-checkpoints", "--config", str(setup["config"]),
                   f"train.output_dir={cluster.local / out}", *overrides, *extra]
        procs.append(subprocess.Popen(on_node(node, command, env), cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a node was still running after 420 s")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, output, ""))
    return results


def assert_same_delta(path: Path, ref: Path):
    a, b = load_file(str(path)), load_file(str(ref / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{path} differs from the reference"


def losses(out_dir: Path) -> list:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def same_files_on_both_nodes(a: Path, b: Path) -> list[str]:
    """The files present under both checkpoint directories; asserts they are byte-identical (each
    node's manifest has its own name, so it is not among them)."""
    common = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()}
                    & {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    for rel in common:
        if rel.suffix == ".pt":
            continue  # torch.save output: pickled, compared through trainer_state and the deltas
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between the nodes"
    return [str(r) for r in common]


def listening(ports: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket listening on one of ``ports`` (IPv4 and IPv6), from /proc."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words),
                              int(port, 16)))
    return found


def test_daemons_listen_on_loopback_only(cluster):
    """sshd (2222), slurmctld (6817) and the slurmds (6818, 6819) listen on 127.0.0.x only."""
    sockets = listening({2222, 6817, 6818, 6819})
    assert {port for _, port in sockets} == {2222, 6817, 6818, 6819}, sockets
    assert all(address.startswith("127.") for address, _ in sockets), sockets


def test_torchrun_two_nodes_node_local_stop_resume_merge(setup):
    """Stop at step 2 and resume, each node on its own disk; the files both nodes hold agree; the
    docs' rsync merge gives a checkpoint that one node resumes exactly; swapped nodes are refused
    naming the rank whose files are missing."""
    cluster, name = setup["cluster"], f"tr-{setup['tag']}"
    node1, node2 = cluster.node_local("node1") / name, cluster.node_local("node2") / name
    for r in torchrun_two_nodes(setup, name, "train.stop_after_steps=2"):
        assert r.returncode == 0, r.stdout[-4000:]
    step2 = "checkpoints/step-000002"
    common = same_files_on_both_nodes(node1 / step2, node2 / step2)
    assert "trainer_state.json" in common and "delta.safetensors" in common
    assert not (node2 / "metrics.jsonl").exists()  # rank 0's files stay on node1
    assert (node1 / step2 / "manifest.rank0.json").is_file() and (node2 / step2 / "manifest.rank1.json").is_file()
    # Keep the stopped state for the merge and the wrong-node resume below.
    merged = setup["tmp"] / "merged"
    for node in ("node1", "node2"):  # the docs' recipe, over ssh from a third machine
        run(["rsync", "-a", f"{NODES[node]}:{cluster.local / name}/checkpoints/", f"{merged}/"], cluster.env())
    assert sorted(p.name for p in (merged / "step-000002").glob("manifest*")) == \
        ["manifest.rank0.json", "manifest.rank1.json"]
    stopped_out = setup["tmp"] / "stopped-out"
    run(["cp", "-a", str(node1), str(stopped_out)], cluster.env())
    swapped = f"sw-{setup['tag']}"
    for node in ("node1", "node2"):
        run(["cp", "-a", str(cluster.node_local(node) / name), str(cluster.node_local(node) / swapped)], cluster.env())

    for r in torchrun_two_nodes(setup, name, "train.resume_from=latest"):
        assert r.returncode == 0, r.stdout[-4000:]
    assert_same_delta(node1 / "delta.safetensors", setup["ref"])
    assert losses(node1) == losses(setup["ref"])
    end = "checkpoints/step-000004"
    assert json.loads((node1 / end / "trainer_state.json").read_text()) == \
        json.loads((node2 / end / "trainer_state.json").read_text())
    same_files_on_both_nodes(node1 / end, node2 / end)

    # One node, two processes, from the merged directory: the same run.
    run([sys.executable, "launch/torchrun.py", "--nproc-per-node", "2", "--config", str(setup["config"]),
         f"train.output_dir={stopped_out}", f"train.checkpoint_dir={merged}", "train.resume_from=latest"],
        cluster.env())
    assert_same_delta(stopped_out / "delta.safetensors", setup["ref"])
    assert losses(stopped_out) == losses(setup["ref"]), "metrics.jsonl lost rows in the merged resume"

    # Node ranks swapped: rank 0 runs on node2, whose disk holds rank 1's shards.
    r0, r1 = torchrun_two_nodes(setup, swapped, "train.resume_from=latest", nodes=("node2", "node1"))
    assert r0.returncode != 0 and r1.returncode != 0
    both = r0.stdout + r1.stdout
    # Both ranks miss their files; whichever fails first is named by both nodes.
    assert re.search(r"rank 0 on host node2 finds no \*zero_pp_rank_0_\* \(the ZeRO shards of rank 0; "
                     r"this directory holds ranks 1\)", both) or \
        re.search(r"rank 1 on host node1 finds no \*zero_pp_rank_1_\* \(the ZeRO shards of rank 1; "
                  r"this directory holds ranks 0\)", both), both[-4000:]


@pytest.mark.parametrize("fault", ["bad-path", "corrupt-weights"])
def test_node_failing_at_load_ends_the_job(setup, fault):
    """node2 cannot load its model: a path that does not exist there (bad input, found before the
    process group exists: exit 2), or weights cut in half (an error while loading, after it: exit 1).
    Both nodes end within seconds, both launchers with the failing rank's code (not torchrun's 1),
    node1 with a message naming rank 1, node2 and the error; node2's exit_status.json holds that
    record (node1's too, if its rank had taken the run directory before it was stopped)."""
    name = f"fail-{fault}-{setup['tag']}"
    if fault == "bad-path":
        model, code, error = "/nonexistent/model", 2, "sparse_ft.errors.ConfigError: model.name_or_path"
    else:
        model, code, error = str(setup["tmp"] / "llama-corrupt"), 1, ""
        shutil.copytree(setup["tmp"] / "llama", model)
        weights = Path(model) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    t0 = time.monotonic()
    r0, r1 = torchrun_two_nodes(setup, name, node2_overrides=[f"model.name_or_path={model}"])
    elapsed = time.monotonic() - t0
    assert (r0.returncode, r1.returncode) == (code, code), r0.stdout[-3000:] + r1.stdout[-3000:]
    assert f"rank 1 on host node2 failed: {error}" in r0.stdout, r0.stdout[-3000:]
    for node in ("node2", "node1"):
        status = setup["cluster"].node_local(node) / name / "exit_status.json"
        if node == "node1" and not status.exists():
            continue
        record = json.loads(status.read_text())
        assert (record["exit_code"], record["rank"], record["host"]) == (code, 1, "node2"), node
    print(f"{fault}: both nodes ended {elapsed:.0f} s after launch")


def test_deepspeed_launcher_over_ssh(setup):
    """launch/multinode.py with a two-host hostfile: pdsh + ssh to both nodes."""
    cluster, out = setup["cluster"], setup["tmp"] / "ds"
    result = run([sys.executable, "launch/multinode.py", "--hostfile", str(cluster.hostfile), "--master-addr",
                  NODES["node1"], "--env", "GLOO_SOCKET_IFNAME=lo", "--config", str(setup["config"]),
                  f"train.output_dir={out}"], cluster.env())
    assert (out / "launch" / "deepspeed_env").read_text() == "GLOO_SOCKET_IFNAME=lo\n"
    assert not (ROOT / ".deepspeed_env").exists()
    assert "127.0.0.3: " in result.stdout + result.stderr  # pdsh prefixes node2's lines
    assert_same_delta(out / "delta.safetensors", setup["ref"])


def test_deepspeed_launcher_one_included_host_runs_there(setup):
    """--include of one host that is not this machine: the job runs on that host over ssh
    (--force_multi), not here with world size 1 as the deepspeed launcher alone would."""
    cluster, name = setup["cluster"], f"inc-{setup['tag']}"
    result = run([sys.executable, "launch/multinode.py", "--hostfile", str(cluster.hostfile), "--include",
                  NODES["node2"], "--master-addr", NODES["node2"], "--env", "GLOO_SOCKET_IFNAME=lo",
                  "--config", str(setup["config"]), f"train.output_dir={cluster.local / name}"], cluster.env())
    assert "--force_multi" in result.stdout + result.stderr
    on_node2, on_node1 = cluster.node_local("node2") / name, cluster.node_local("node1") / name
    assert json.loads((on_node2 / "exit_status.json").read_text()) == {"exit_code": 0}
    assert (on_node2 / "delta.safetensors").is_file() and not (on_node1 / "delta.safetensors").exists()


def submit(setup, out: Path) -> str:
    cluster = setup["cluster"]
    result = run([sys.executable, "launch/slurm_submit.py", "--nodes", "2", "--gpus-per-node", "0",
                  "--procs-per-node", "1", "--cpus-per-task", "1", "--env", "GLOO_SOCKET_IFNAME=lo",
                  "--config", str(setup["config"]), f"train.output_dir={out}"], cluster.env())
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


def wait_for_jobs(setup, job_ids: list[str], timeout: float = 420) -> dict[str, str]:
    """Job id -> 'ExitCode=a:b' once every job has left the queue."""
    env, deadline = setup["cluster"].env(), time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        for job in job_ids:
            info = run(["scontrol", "show", "job", job], env, check=False).stdout
            state = re.search(r"JobState=(\S+)", info)
            if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                code = re.search(r"ExitCode=(\S+)", info)
                states[job] = f"{state.group(1)} {code.group(1) if code else '?'}"
        if len(states) == len(job_ids):
            return states
        time.sleep(2)
    run(["scancel", *job_ids], env, check=False)
    pytest.fail(f"SLURM jobs {job_ids} did not finish in {timeout} s (states so far: {states})")


def test_sbatch_template_and_two_concurrent_jobs(setup):
    """Two jobs on the same two nodes at once (each node has room for both): different rendezvous
    ports from their job ids, both finish with the reference delta; exit code 0 in SLURM."""
    outs = [setup["tmp"] / "slurm-a", setup["tmp"] / "slurm-b"]
    jobs = [submit(setup, out) for out in outs]
    states = wait_for_jobs(setup, jobs)
    for job, out in zip(jobs, outs):
        log = (out / f"slurm-{job}.out").read_text()
        assert states[job] == "COMPLETED 0:0", log[-4000:]
        assert_same_delta(out / "delta.safetensors", setup["ref"])
        assert json.loads((out / "exit_status.json").read_text()) == {"exit_code": 0}
    ports = {re.search(r"--rdzv_endpoint node1:(\d+)", (out / f"slurm-{job}.out").read_text()).group(1)
             for job, out in zip(jobs, outs)}
    assert len(ports) == 2
