"""``launch/slurm.py`` (run by ``launch/slurm_train.sbatch``): inside a SLURM job, srun + torchrun
on every node, or a hostfile for the deepspeed launcher."""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..training.jobstatus import EXIT_STATUS_FILE
from .common import (REPO_ROOT, LaunchPlan, _add_train_arguments, _entry, check_port, check_positive, display_path,
                     launch_dir, parse_env_pairs, port_in_use, run_directory, run_plan, train_arguments, train_script)
from .hostfile import format_hostfile
from .multinode import DeepSpeedLaunch, deepspeed_plan



def _expand_brackets(body: str, whole: str) -> list[str]:
    """``001-003,007`` -> ['001', '002', '003', '007'], keeping the zero padding of each range."""
    out = []
    for item in body.split(","):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ConfigError(f"SLURM_JOB_NODELIST={whole!r}: [{body}] is not a list of numbers and ranges")
        if not dash:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ConfigError(f"SLURM_JOB_NODELIST={whole!r}: range {item} runs backwards")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas outside brackets: ``gpu[1,3],cpu5`` -> ['gpu[1,3]', 'cpu5']."""
    parts, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced or nested brackets")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets")
    return [*parts, current]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list to host names, in order: ``gpu[001-003,007],cpu5`` -> gpu001,
    gpu002, gpu003, gpu007, cpu5. Several bracket groups in one name multiply (``r[1-2]n[1-2]``).
    Written here so the launcher needs no ``scontrol`` (see :func:`slurm_hosts` for the fallback)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is empty")
    hosts: list[str] = []
    for token in _split_top_level(nodelist):
        if not token:
            raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: empty host name")
        pieces = re.split(r"\[([^\[\]]*)\]", token)
        # re.split with a group alternates literal text and bracket bodies.
        choices = [[p] if i % 2 == 0 else _expand_brackets(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: lists {', '.join(duplicates)} more than once")
    return hosts


def slurm_hosts(nodelist: str) -> list[str]:
    """:func:`expand_nodelist`, falling back to ``scontrol show hostnames`` for a form it does not
    know when scontrol is installed."""
    try:
        return expand_nodelist(nodelist)
    except ConfigError:
        if not shutil.which("scontrol"):
            raise
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if result.returncode != 0 or not result.stdout.split():
            raise
        return result.stdout.split()


def _require_env(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        if environ.get(name, "").strip():
            return environ[name].strip()
    raise ConfigError(f"{names[0]} is not set: launch/slurm.py runs inside a SLURM job "
                      "(sbatch launch/slurm_train.sbatch ...); use launch/multinode.py or launch/torchrun.py elsewhere")


def slurm_gpus_per_node(environ: Mapping[str, str], flag_value: int | None) -> int:
    """``--gpus-per-node``, else ``SLURM_GPUS_ON_NODE``, else the count in ``SLURM_GPUS_PER_NODE``
    (``8`` or ``a100:8``). Nodes are assumed alike: the batch step sees only its own node."""
    if flag_value is not None:
        return check_positive(flag_value, "--gpus-per-node")
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        raw = environ.get(name, "").strip()
        if raw:
            count = raw.rsplit(":", 1)[-1]
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(f"{name}={raw!r} is not a GPU count; give --gpus-per-node")
            return int(count)
    raise ConfigError("--gpus-per-node not given and neither SLURM_GPUS_ON_NODE nor SLURM_GPUS_PER_NODE is set "
                      "(submit with #SBATCH --gpus-per-node=N or pass --gpus-per-node)")


@dataclass
class SlurmJob:
    """What the launcher needs from a SLURM job's environment."""

    job_id: str
    hosts: list[str]
    gpus_per_node: int
    cpus_per_task: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], gpus_per_node: int | None = None) -> SlurmJob:
        nodelist = _require_env(environ, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        job_id = _require_env(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        nnodes = _require_env(environ, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
        hosts = slurm_hosts(nodelist)
        if not nnodes.isdigit() or int(nnodes) != len(hosts):
            raise ConfigError(f"SLURM_NNODES={nnodes!r} does not match the {len(hosts)} hosts in "
                              f"SLURM_JOB_NODELIST={nodelist!r}")
        return cls(job_id, hosts, slurm_gpus_per_node(environ, gpus_per_node),
                   environ.get("SLURM_CPUS_PER_TASK") or None)


PORT_RANGE = (20000, 30000)
"""Rendezvous ports of SLURM jobs: ``PORT_RANGE[0] + job id mod the range's width``, then the next
free one. Below Linux's ephemeral range (32768-60999), so no outgoing connection holds them."""


def job_port(job_id: str, in_use: Callable[[int], bool] | None = None) -> int:
    """The job's rendezvous port, derived from its id so that jobs sharing nodes differ; ``in_use``
    (a check on the first node) moves it on to the next free port in :data:`PORT_RANGE`."""
    lo, hi = PORT_RANGE
    digits = "".join(c for c in job_id if c.isdigit()) or "0"  # array jobs: 1234_7
    start = int(digits) % (hi - lo)
    for step in range(hi - lo):
        port = lo + (start + step) % (hi - lo)
        if in_use is None or not in_use(port):
            return port
    raise ConfigError(f"no free port in {lo}-{hi - 1} on this node for the rendezvous; pass --master-port")


def on_first_host(job: SlurmJob) -> bool:
    """Whether this process runs on the job's first node, which hosts the rendezvous (the batch
    step does)."""
    return socket.gethostname().split(".")[0] == job.hosts[0].split(".")[0]


def slurm_torchrun_command(job: SlurmJob, port: int, train_args: Sequence[str]) -> list[str]:
    """One torchrun per node through srun, meeting at a c10d rendezvous on the first host.
    torchrun orders nodes by host name, so the same hosts get the same node ranks on a rerun."""
    srun = ["srun", f"--nodes={len(job.hosts)}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.cpus_per_task:
        # SLURM >= 22.05 no longer passes sbatch's --cpus-per-task on to srun; without this each
        # torchrun (and its 8 workers) would be pinned to one core.
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    torchrun = ["torchrun", "--nnodes", str(len(job.hosts)), "--nproc_per_node", str(job.gpus_per_node),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{job.hosts[0]}:{check_port(port)}",
                "--rdzv_id", job.job_id]
    return [*srun, *torchrun, train_script(), *train_args]


def slurm_plan(job: SlurmJob, launcher: str, port: int | None, train_args: Sequence[str], env: Mapping[str, str],
               hostfile_out: str | None) -> LaunchPlan:
    """``port`` None: :func:`job_port` (checked free when this is the first node)."""
    if port is None:
        port = job_port(job.job_id, port_in_use if on_first_host(job) else None)
    run_dir = run_directory(train_args)
    if launcher == "torchrun":
        # srun exports the caller's whole environment to every node, so env needs no file.
        return LaunchPlan(slurm_torchrun_command(job, port, train_args), dict(env),
                          status_file=run_dir / EXIT_STATUS_FILE)
    hosts = {host: job.gpus_per_node for host in job.hosts}
    hostfile = hostfile_out or str(launch_dir(run_dir) / f"hostfile.{job.job_id}")
    launch = DeepSpeedLaunch(hostfile=hostfile, master_addr=job.hosts[0], master_port=port)
    return deepspeed_plan(launch, hosts, train_args, env, {Path(hostfile): format_hostfile(hosts)})



def _slurm_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Inside a SLURM job (one task per node): launch "
                                     "launch/train.py on every node of the job with torchrun (srun) or deepspeed.")
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun",
                        help="torchrun: srun starts one torchrun per node, no ssh needed (default); deepspeed: "
                             "write a hostfile and run the deepspeed launcher, which needs pdsh and ssh between nodes")
    parser.add_argument("--gpus-per-node", type=int, help="default: SLURM_GPUS_ON_NODE")
    parser.add_argument("--master-port", type=int, help=f"rendezvous port on the first node (default: "
                        f"{PORT_RANGE[0]} + SLURM_JOB_ID mod {PORT_RANGE[1] - PORT_RANGE[0]}, the next free one if taken)")
    parser.add_argument("--hostfile-out", help="deepspeed: where to write the hostfile "
                        "(default <train.output_dir>/launch/hostfile.$SLURM_JOB_ID)")
    _add_train_arguments(parser)
    return parser


def build_slurm(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """The plan for this SLURM job; SLURM variables come from ``environ`` (default os.environ)."""
    job = SlurmJob.from_environ(os.environ if environ is None else environ, args.gpus_per_node)
    env = parse_env_pairs(args.env)
    train_args = train_arguments(args.config, args.overrides, args.node_local_checkpoints)
    return slurm_plan(job, args.launcher, args.master_port, train_args, env, args.hostfile_out)


def slurm_main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    return _entry(_slurm_parser("launch/slurm.py"), lambda args: build_slurm(args, environ), argv)


# --------------------------------------------------------------------------- submitting


@dataclass
class SlurmResources:
    """What ``launch/slurm_submit.py`` asks sbatch for; every default is printed by ``--dry-run``."""

    nodes: int = 2
    gpus_per_node: int = 8
    procs_per_node: int | None = None
    """Training processes per node (default: ``gpus_per_node``; required when that is 0)."""
    cpus_per_task: int = 16
    partition: str | None = None
    time: str | None = None
    account: str | None = None


@dataclass
class PartitionSize:
    """The largest node of a partition and how many nodes it has, from ``sinfo``."""

    name: str
    nodes: int
    cpus: int
    gpus: int


def parse_sinfo(text: str) -> dict[str, PartitionSize]:
    """``sinfo -h -o '%P|%D|%c|%G'`` lines to partition -> sizes (lines of one partition with
    different node kinds add their nodes and keep the largest node)."""
    out: dict[str, PartitionSize] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, nodes, cpus, gres = (p.strip() for p in parts)
        name = name.rstrip("*")
        gpus = max([int(m) for m in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres)] or [0])
        cpu_count = int(re.match(r"\d*", cpus).group() or 0)
        size = PartitionSize(name, int(nodes) if nodes.isdigit() else 0, cpu_count, gpus)
        if name in out:
            old = out[name]
            size = PartitionSize(name, old.nodes + size.nodes, max(old.cpus, size.cpus), max(old.gpus, size.gpus))
        out[name] = size
    return out


def default_partition(text: str) -> str | None:
    for line in text.splitlines():
        name = line.split("|", 1)[0].strip()
        if name.endswith("*"):
            return name[:-1]
    return None


def fit_problems(res: SlurmResources, sinfo_text: str) -> list[str]:
    """Why the request cannot run on the partition, judged from ``sinfo`` output (empty: it fits)."""
    sizes = parse_sinfo(sinfo_text)
    name = res.partition or default_partition(sinfo_text)
    if name is None:
        return ["sinfo shows no default partition; pass --partition"]
    if name not in sizes:
        return [f"partition {name!r} does not exist (sinfo lists: {', '.join(sizes) or 'none'})"]
    part, problems = sizes[name], []
    if res.nodes > part.nodes:
        problems.append(f"--nodes {res.nodes} but partition {name} has {part.nodes} nodes")
    if res.cpus_per_task > part.cpus:
        problems.append(f"--cpus-per-task {res.cpus_per_task} but the largest node of {name} has {part.cpus} CPUs")
    if res.gpus_per_node > part.gpus:
        problems.append(f"--gpus-per-node {res.gpus_per_node} but the nodes of {name} have "
                        f"{part.gpus or 'no'} GPUs (sinfo GRES)")
    return problems


def sbatch_command(res: SlurmResources, run_dir: Path, slurm_args: Sequence[str]) -> list[str]:
    procs = res.procs_per_node if res.procs_per_node is not None else res.gpus_per_node
    command = ["sbatch", f"--nodes={res.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={res.cpus_per_task}"]
    if res.gpus_per_node:
        command.append(f"--gpus-per-node={res.gpus_per_node}")
    for flag, value in (("--partition", res.partition), ("--time", res.time), ("--account", res.account)):
        if value:
            command.append(f"{flag}={value}")
    command.append(f"--output={run_dir / 'slurm-%j.out'}")
    return [*command, display_path(SBATCH_TEMPLATE), "--gpus-per-node", str(procs), *slurm_args]


SBATCH_TEMPLATE = REPO_ROOT / "launch" / "slurm_train.sbatch"


def _submit_parser(prog: str) -> argparse.ArgumentParser:
    defaults = SlurmResources()
    parser = argparse.ArgumentParser(prog=prog, description="Submit launch/slurm_train.sbatch with the resources "
                                     "given here (defaults shown by --dry-run), after checking with sinfo that "
                                     "the partition can hold them. Other arguments go to launch/slurm.py.")
    parser.add_argument("--nodes", type=int, default=defaults.nodes, help=f"nodes (default {defaults.nodes})")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node,
                        help=f"GPUs per node, 0 for none (default {defaults.gpus_per_node})")
    parser.add_argument("--procs-per-node", type=int, help="training processes per node (default: --gpus-per-node)")
    parser.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task,
                        help=f"CPUs for each node's task (default {defaults.cpus_per_task})")
    parser.add_argument("--partition", help="default: the cluster's default partition")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--force", action="store_true", help="submit even when sinfo says it cannot fit")
    return parser


def build_submit(args: argparse.Namespace, slurm_args: list[str]) -> tuple[LaunchPlan, list[str]]:
    """The sbatch plan and the warnings about the partition (empty when it fits or sinfo is absent)."""
    res = SlurmResources(nodes=check_positive(args.nodes, "--nodes"), gpus_per_node=args.gpus_per_node,
                         procs_per_node=args.procs_per_node, cpus_per_task=check_positive(args.cpus_per_task,
                                                                                          "--cpus-per-task"),
                         partition=args.partition, time=args.time, account=args.account)
    if res.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node = {res.gpus_per_node}; allowed: 0 or more")
    if res.gpus_per_node == 0 and res.procs_per_node is None:
        raise ConfigError("--gpus-per-node 0 needs --procs-per-node N (training processes per node)")
    if res.procs_per_node is not None:
        check_positive(res.procs_per_node, "--procs-per-node")
    # The training arguments, checked as launch/slurm.py will check them on the first node.
    inner = _slurm_parser("launch/slurm.py").parse_intermixed_args(["--gpus-per-node", "1", *slurm_args])
    train_args = train_arguments(inner.config, inner.overrides, inner.node_local_checkpoints)
    run_dir = run_directory(train_args)
    warnings: list[str] = []
    if shutil.which("sinfo"):
        result = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G"], capture_output=True, text=True)
        if result.returncode == 0:
            warnings = fit_problems(res, result.stdout)
    plan = LaunchPlan(sbatch_command(res, run_dir, slurm_args), directories=[run_dir])  # sbatch's --output
    return plan, warnings


def submit_main(argv: Sequence[str] | None = None) -> int:
    parser = _submit_parser("launch/slurm_submit.py")
    args, rest = parser.parse_known_args(argv)
    dry_run = "--dry-run" in rest
    rest = [a for a in rest if a != "--dry-run"]
    try:
        plan, warnings = build_submit(args, rest)
        for warning in warnings:
            print(f"launch/slurm_submit.py: warning: the request cannot run on this cluster: {warning}",
                  file=sys.stderr)
        if warnings and not args.force and not dry_run:
            print("launch/slurm_submit.py: error: not submitted (it would stay PENDING); change the resources "
                  "or pass --force", file=sys.stderr)
            return 2
        return run_plan(plan, dry_run)
    except ConfigError as e:
        print(f"launch/slurm_submit.py: error: {e}", file=sys.stderr)
        return 2
