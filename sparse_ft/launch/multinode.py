"""``launch/multinode.py``: the deepspeed launcher over a hostfile (pdsh/ssh to every host)."""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .common import (DEFAULT_MASTER_PORT, LaunchPlan, _add_train_arguments, _entry, check_address, check_port,
                     check_positive, deepspeed_env_path, merged_deepspeed_env, parse_env_pairs, train_arguments,
                     train_script)
from .hostfile import parse_resource_filter, read_hostfile



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


def check_deepspeed_launch(launch: DeepSpeedLaunch, hosts: Mapping[str, int]) -> None:
    """The deepspeed runner's own rules, checked before anything starts."""
    if launch.include is not None and launch.exclude is not None:
        raise ConfigError("--include and --exclude cannot be combined (the deepspeed launcher rejects it)")
    if (launch.include is not None or launch.exclude is not None) and (launch.num_gpus or launch.num_nodes):
        raise ConfigError("--num-gpus/--num-nodes cannot be combined with --include/--exclude "
                          "(the deepspeed launcher rejects it); say which slots with --include instead")
    if launch.include is not None:
        parse_resource_filter(launch.include, hosts, "--include")
    if launch.exclude is not None:
        excluded = parse_resource_filter(launch.exclude, hosts, "--exclude")
        if all(len(excluded.get(h, [])) == n for h, n in hosts.items()):
            raise ConfigError(f"--exclude {launch.exclude!r} excludes every slot in the hostfile")
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


def deepspeed_command(launch: DeepSpeedLaunch, train_args: Sequence[str]) -> list[str]:
    command = ["deepspeed", "--hostfile", launch.hostfile]
    for flag, value in (("--include", launch.include), ("--exclude", launch.exclude),
                        ("--num_nodes", launch.num_nodes), ("--num_gpus", launch.num_gpus),
                        ("--master_addr", launch.master_addr), ("--master_port", launch.master_port)):
        if value is not None:
            command += [flag, str(value)]
    return [*command, train_script(), *train_args]


def deepspeed_plan(launch: DeepSpeedLaunch, hosts: Mapping[str, int], train_args: Sequence[str],
                   env: Mapping[str, str], extra_files: Mapping[Path, str] | None = None) -> LaunchPlan:
    """``env`` goes to ``.deepspeed_env`` (the deepspeed runner exports it on every node) and to
    the launcher's own environment (a launch that ends up on one host never reads the file)."""
    check_deepspeed_launch(launch, hosts)
    files = dict(extra_files or {})
    if env:
        path = deepspeed_env_path()
        files[path] = merged_deepspeed_env(path, env)
    return LaunchPlan(deepspeed_command(launch, train_args), dict(env), files)



def _multinode_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Launch launch/train.py on several nodes with the "
                                     "deepspeed launcher (pdsh/ssh to the hosts of a hostfile).")
    parser.add_argument("--hostfile", required=True, help="lines 'HOST slots=N'; '#' comments allowed")
    parser.add_argument("--master-addr", help="address of the first node (default: deepspeed asks it over ssh)")
    parser.add_argument("--master-port", type=int, help=f"rendezvous port (deepspeed default {DEFAULT_MASTER_PORT})")
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
