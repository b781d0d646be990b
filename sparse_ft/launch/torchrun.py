"""``launch/torchrun.py``: torchrun on one node, or on several with static node ranks."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..training.jobstatus import EXIT_STATUS_FILE
from .common import (DEFAULT_MASTER_PORT, LaunchPlan, _add_train_arguments, _entry, check_address, check_port,
                     check_positive, parse_env_pairs, run_directory, train_arguments, train_script)

def check_nproc(nproc: str, flag: str = "--nproc-per-node") -> str:
    if nproc in ("gpu", "auto", "cpu") or (nproc.isdigit() and int(nproc) >= 1):
        return nproc
    raise ConfigError(f"{flag} = {nproc!r}; allowed: a positive integer, gpu, cpu or auto")


@dataclass
class TorchrunLaunch:
    """A static torchrun launch: one node (``--standalone``) or ``nnodes`` with fixed node ranks."""

    nproc_per_node: str = "gpu"
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None


def torchrun_command(launch: TorchrunLaunch, train_args: Sequence[str]) -> list[str]:
    check_nproc(launch.nproc_per_node)
    check_positive(launch.nnodes, "--nnodes")
    if launch.master_port is not None:
        check_port(launch.master_port)
    if launch.master_addr is not None:
        check_address(launch.master_addr)
    head = ["torchrun"]
    if launch.nnodes == 1 and launch.master_addr is None and launch.master_port is None:
        head += ["--standalone", "--nnodes", "1"]
    else:
        if launch.nnodes > 1 and launch.master_addr is None:
            raise ConfigError(f"--master-addr is required with --nnodes {launch.nnodes}: the address of node rank 0")
        if launch.nnodes > 1 and launch.node_rank is None:
            raise ConfigError(f"--node-rank is required with --nnodes {launch.nnodes}: 0 on the master node, "
                              f"then 1..{launch.nnodes - 1}")
        node_rank = launch.node_rank or 0
        if not 0 <= node_rank < launch.nnodes:
            raise ConfigError(f"--node-rank = {node_rank}; allowed: 0-{launch.nnodes - 1} for --nnodes {launch.nnodes}")
        head += ["--nnodes", str(launch.nnodes), "--node_rank", str(node_rank),
                 "--master_addr", launch.master_addr or "127.0.0.1",
                 "--master_port", str(launch.master_port or DEFAULT_MASTER_PORT)]
    return [*head, "--nproc_per_node", launch.nproc_per_node, train_script(), *train_args]



def _torchrun_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Launch launch/train.py with torchrun on one node, "
                                     "or on several (run the same command on each with its --node-rank).")
    parser.add_argument("--nproc-per-node", default="gpu", help="processes per node: N, gpu (all GPUs), cpu, auto")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--node-rank", type=int, help="this node's rank, 0..nnodes-1 (required with --nnodes > 1)")
    parser.add_argument("--master-addr", help="address of node rank 0 (required with --nnodes > 1)")
    parser.add_argument("--master-port", type=int, help=f"port on node rank 0, the same on every node (default {DEFAULT_MASTER_PORT}; "
                        "node rank 0 refuses a port that is in use: give each concurrent job its own)")
    _add_train_arguments(parser)
    return parser


def build_torchrun(args: argparse.Namespace) -> LaunchPlan:
    env = parse_env_pairs(args.env)
    train_args = train_arguments(args.config, args.overrides, args.node_local_checkpoints)
    launch = TorchrunLaunch(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                            master_addr=args.master_addr, master_port=args.master_port)
    plan = LaunchPlan(torchrun_command(launch, train_args), env, status_file=run_directory(train_args) / EXIT_STATUS_FILE)
    if launch.nnodes > 1 and (launch.node_rank or 0) == 0:
        # Node rank 0 hosts the rendezvous: a port already held here is another job's, which
        # torchrun would silently join.
        plan.free_port_required = launch.master_port or DEFAULT_MASTER_PORT
    return plan



def torchrun_main(argv: Sequence[str] | None = None) -> int:
    return _entry(_torchrun_parser("launch/torchrun.py"), build_torchrun, argv)
