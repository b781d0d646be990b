"""``launch/multinode.py``: the deepspeed launcher over a hostfile (pdsh/ssh to every host)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..training.jobstatus import EXIT_STATUS_FILE
from .common import (LaunchPlan, _add_train_arguments, _entry, check_address, check_port, check_positive,
                     deepspeed_env_path, deepspeed_env_text, free_port, parse_env_pairs, run_directory,
                     train_arguments, train_script)
from .hostfile import active_slots, read_hostfile


@dataclass
class DeepSpeedLaunch:
    """Arguments of the ``deepspeed`` launcher, named as its flags are."""

    hostfile: str
    include: str | None = None
    exclude: str | None = None
    num_nodes: int | None = None
    num_gpus: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    force_multi: bool = False
    """Launch over ssh even when one host is left: without it deepspeed runs a single remaining
    host's share on the launching machine instead (set by :func:`check_deepspeed_launch`)."""


def check_deepspeed_launch(launch: DeepSpeedLaunch, hosts: Mapping[str, int]) -> dict[str, list[int]]:
    """The deepspeed runner's own rules, checked before anything starts; returns the host -> slots
    it will use (computed by deepspeed's functions, see :func:`.hostfile.active_slots`)."""
    if launch.include is not None and launch.exclude is not None:
        raise ConfigError("--include and --exclude cannot be combined (the deepspeed launcher rejects it)")
    if (launch.include is not None or launch.exclude is not None) and (launch.num_gpus or launch.num_nodes):
        raise ConfigError("--num-gpus/--num-nodes cannot be combined with --include/--exclude "
                          "(the deepspeed launcher rejects it); say which slots with --include instead")
    if launch.num_nodes is not None:
        check_positive(launch.num_nodes, "--num-nodes")
        if launch.num_nodes > len(hosts):
            raise ConfigError(f"--num-nodes = {launch.num_nodes} but the hostfile lists {len(hosts)} hosts")
    if launch.num_gpus is not None:
        check_positive(launch.num_gpus, "--num-gpus")
        used = list(hosts.items())[:launch.num_nodes or len(hosts)]
        short = [f"{h} (slots={n})" for h, n in used if n < launch.num_gpus]
        if short:
            raise ConfigError(f"--num-gpus = {launch.num_gpus} is more than the hostfile gives {', '.join(short)}")
    if launch.master_addr is not None:
        check_address(launch.master_addr)
    if launch.master_port is not None:
        check_port(launch.master_port)
    active = active_slots(hosts, launch.include, launch.exclude, launch.num_nodes, launch.num_gpus)
    if not active:
        raise ConfigError(f"--exclude {launch.exclude!r} excludes every slot in the hostfile")
    if len(active) == 1:
        launch.force_multi = True
    return active


def deepspeed_command(launch: DeepSpeedLaunch, train_args: Sequence[str]) -> list[str]:
    command = ["deepspeed", "--hostfile", launch.hostfile]
    for flag, value in (("--include", launch.include), ("--exclude", launch.exclude),
                        ("--num_nodes", launch.num_nodes), ("--num_gpus", launch.num_gpus),
                        ("--master_addr", launch.master_addr), ("--master_port", launch.master_port)):
        if value is not None:
            command += [flag, str(value)]
    if launch.force_multi:
        command.append("--force_multi")
    return [*command, train_script(), *train_args]


def deepspeed_plan(launch: DeepSpeedLaunch, hosts: Mapping[str, int], train_args: Sequence[str],
                   env: Mapping[str, str], extra_files: Mapping[Path, str] | None = None) -> LaunchPlan:
    """``env`` goes to the run's own env file, ``<output_dir>/launch/deepspeed_env``, which the
    deepspeed runner reads (as ``DS_ENV_FILE``) and exports on every node; and to the launcher's
    own environment. Without ``--master-port`` a free port of this machine is chosen, so two jobs
    launched from here never share a rendezvous."""
    active = check_deepspeed_launch(launch, hosts)
    if launch.master_port is None:
        launch.master_port = free_port()
    if launch.force_multi:
        print(f"{sys.argv[0]}: one host left ({next(iter(active))}): launching on it over ssh (--force_multi), "
              "not on this machine", file=sys.stderr)
    run_dir = run_directory(train_args)
    env_file = deepspeed_env_path(run_dir)
    files = {env_file: deepspeed_env_text(env), **(extra_files or {})}
    return LaunchPlan(deepspeed_command(launch, train_args), {"DS_ENV_FILE": str(env_file), **env}, files,
                      status_file=run_dir / EXIT_STATUS_FILE)


def _multinode_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Launch launch/train.py on several nodes with the "
                                     "deepspeed launcher (pdsh/ssh to the hosts of a hostfile).")
    parser.add_argument("--hostfile", required=True, help="lines 'HOST slots=N'; '#' comments allowed")
    parser.add_argument("--master-addr", help="address of the first node (default: deepspeed asks it over ssh)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: a free port of this machine)")
    parser.add_argument("--include", help="deepspeed resource filter, e.g. worker-1:0,1@worker-2")
    parser.add_argument("--exclude", help="deepspeed resource filter of slots not to use")
    parser.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    parser.add_argument("--num-gpus", type=int, help="use GPUs 0..N-1 on each host")
    _add_train_arguments(parser)
    return parser


def build_multinode(args: argparse.Namespace) -> LaunchPlan:
    hosts = read_hostfile(args.hostfile)
    env = parse_env_pairs(args.env)
    train_args = train_arguments(args.config, args.overrides, args.node_local_checkpoints)
    launch = DeepSpeedLaunch(hostfile=args.hostfile, include=args.include, exclude=args.exclude,
                             num_nodes=args.num_nodes, num_gpus=args.num_gpus, master_addr=args.master_addr,
                             master_port=args.master_port)
    return deepspeed_plan(launch, hosts, train_args, env)


def multinode_main(argv: Sequence[str] | None = None) -> int:
    return _entry(_multinode_parser("launch/multinode.py"), build_multinode, argv)
