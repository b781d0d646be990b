"""What every launcher shares: the :class:`LaunchPlan` it builds, the small argument checks, the
training arguments (checked before anything starts), ``--env`` parsing, and running a plan."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import SECTIONS, _section, output_dir_of, parse_overrides, set_dotted
from ..errors import ConfigError
from ..methods import config_from_dict
from ..training.jobstatus import EXIT_STATUS_FILE, LAUNCH_STATUS_ENV, failure_message, read_exit_status

DEFAULT_MASTER_PORT = 29500
"""torch.distributed's and the deepspeed launcher's default rendezvous port."""

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"

NODE_LOCAL_CHECKPOINT_OVERRIDE = "deepspeed.overrides.checkpoint.use_node_local_storage=true"
"""Dotted rather than ``deepspeed.overrides={checkpoint: ...}``: the dotted form merges into the
overrides a config file already has, the flow-mapping form would replace them."""
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The deepspeed runner pastes .deepspeed_env values into a remote shell line inside double quotes.
_ENV_VALUE_UNSAFE = set('"`$\\\n\r')


@dataclass
class LaunchPlan:
    """What a launcher would do: write ``files``, then run ``command`` with ``env`` added."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)
    status_file: Path | None = None
    """The run's ``exit_status.json``: its code replaces the launcher's when the launch fails
    (torchrun and srun report every failure as 1)."""
    directories: list[Path] = field(default_factory=list)
    """Created before the launch (e.g. where sbatch writes its output)."""
    free_port_required: int | None = None
    """A rendezvous port this machine will host: checked free just before the launch."""

    def shell_line(self) -> str:
        """The command as one copy-pasteable shell line, environment assignments first."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.command)])

    def describe(self) -> str:
        """Dry-run text: each file's path and content, then the command line (always last)."""
        parts = [f"# {display_path(path)}\n{text}" for path, text in self.files.items()]
        return "".join(parts) + "# command\n" + self.shell_line() + "\n"


# --------------------------------------------------------------------------- small checks


def check_port(port: int, flag: str = "--master-port") -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} = {port}; allowed: a TCP port 1-65535")
    return port


def check_positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag} = {value}; allowed: a positive integer")
    return value


def check_address(address: str, flag: str = "--master-addr") -> str:
    if not address or any(c.isspace() for c in address):
        raise ConfigError(f"{flag} = {address!r}; allowed: a host name or IP address without spaces")
    return address


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, so the printed command
    reads like the documented ones; absolute otherwise. Launchers run every process from the same
    working directory (deepspeed's pdsh runner ``cd``s there, srun inherits it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(path).resolve())


# --------------------------------------------------------------------------- environment


def parse_env_pairs(pairs: Sequence[str], flag: str = "--env") -> dict[str, str]:
    """``KEY=VALUE`` strings to a dict, rejecting values the deepspeed runner cannot quote."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE with KEY a variable name (e.g. NCCL_IB_DISABLE=1)")
        if _ENV_VALUE_UNSAFE & set(value):
            raise ConfigError(f"{flag} {pair!r}: the value may not contain quotes, $, backquotes, backslashes "
                              "or newlines (the deepspeed launcher pastes it into a remote shell line)")
        env[key] = value
    return env


LAUNCH_DIR = "launch"
"""Under ``train.output_dir``: the files a launcher writes for one run (env file, hostfile)."""


def launch_dir(run_dir: Path) -> Path:
    return run_dir / LAUNCH_DIR


def deepspeed_env_path(run_dir: Path) -> Path:
    """The run's own env file for the deepspeed runner, passed as an absolute ``DS_ENV_FILE``: the
    runner then reads only this file (not ``./.deepspeed_env`` nor ``~/.deepspeed_env``), so a
    variable left from another run can never reach this one."""
    return (launch_dir(run_dir) / "deepspeed_env").resolve()


def deepspeed_env_text(env: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in env.items())


# --------------------------------------------------------------------------- ports


def port_in_use(port: int) -> bool:
    """Whether a listening socket on this machine holds ``port`` (any address)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A port no one listens on here (the kernel picks it from its ephemeral range)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- training arguments


def train_arguments(config: str, overrides: Sequence[str], node_local_checkpoints: bool) -> list[str]:
    """The arguments after ``launch/train.py``, checked the way ``train.py`` will read them.

    Checks what needs neither model nor data: the config file exists and is a YAML mapping, each
    override parses, and every section key is known and well typed after the overrides. Path
    checks (model, data) are left to train.py on the nodes, since with node-local storage those
    paths may not exist where the launcher runs.
    """
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"--config: file {config} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {config} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {config} must hold a mapping with sections model, method, task, train, deepspeed")
    extra = [*overrides, NODE_LOCAL_CHECKPOINT_OVERRIDE] if node_local_checkpoints else list(overrides)
    for key, value in parse_overrides(extra):
        set_dotted(tree, key, value)
    # The key and type checks of config.from_dict, without its validate() (which checks paths).
    unknown = sorted(set(tree) - {*SECTIONS, "method"})
    if unknown:
        raise ConfigError(f"--config {config}: {unknown[0]!r} is not a config section; "
                          f"allowed: {', '.join([*SECTIONS, 'method'])}")
    for name, cls in SECTIONS.items():
        _section(name, cls, tree.get(name))
    config_from_dict(tree.get("method") or {"name": "random_mask"})
    return ["--config", config, *extra]


def run_directory(train_args: Sequence[str]) -> Path:
    """``train.output_dir`` as ``train.py`` will see it with these arguments (from :func:`train_arguments`)."""
    return output_dir_of(train_args[1], train_args[2:])


def train_script() -> str:
    return display_path(TRAIN_SCRIPT)


# --------------------------------------------------------------------------- running


def run_plan(plan: LaunchPlan, dry_run: bool) -> int:
    """Print the plan, or write its files and run its command; returns the command's exit code
    (128 + N when it died of signal N, as a shell reports it)."""
    if dry_run:
        sys.stdout.write(plan.describe())
        return 0
    executable = plan.command[0]
    if not shutil.which(executable):
        raise ConfigError(f"{executable}: command not found on PATH (is the environment with deepspeed/torch active?)")
    if plan.free_port_required is not None and port_in_use(plan.free_port_required):
        raise ConfigError(f"rendezvous port {plan.free_port_required} is in use on this machine (another job's "
                          "rendezvous?); pass a different --master-port (the same on every node)")
    for directory in plan.directories:
        directory.mkdir(parents=True, exist_ok=True)
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    print(plan.shell_line(), file=sys.stderr, flush=True)
    started = time.time()
    # This launch's own status file: written by local rank 0 of the nodes this launch's environment
    # reaches (torchrun, srun), even by ranks that ended before taking the run directory.
    fd, own_status = tempfile.mkstemp(prefix="sparse-ft-launch-status-", suffix=".json")
    os.close(fd)
    os.unlink(own_status)
    try:
        code = _launch(plan.command, {**os.environ, **plan.env, LAUNCH_STATUS_ENV: own_status})
        code = 128 - code if code < 0 else code
        if code == 0 or plan.status_file is None:
            return code
        for source in (Path(own_status), plan.status_file):
            record = read_exit_status(source, newer_than=started - 1)
            if record is not None and record["exit_code"] != 0:
                if "error" in record:
                    print(f"{plan.command[0]}: {failure_message(record)}", file=sys.stderr)
                shown = plan.status_file if source == plan.status_file else "the job's status"
                print(f"exit code {record['exit_code']} from {shown} (the launcher reported {code})", file=sys.stderr)
                return record["exit_code"]
        return code
    finally:
        Path(own_status).unlink(missing_ok=True)


def _launch(command: list[str], env: dict[str, str]) -> int:
    """The one place that starts a process (tests replace it)."""
    try:
        return subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------- command lines


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML, passed to launch/train.py")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides passed to launch/train.py, e.g. train.lr=1e-2")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                        help="environment variable for every rank, e.g. NCCL_SOCKET_IFNAME=eth0 (repeatable)")
    parser.add_argument("--node-local-checkpoints", action="store_true",
                        help="checkpoints on node-local storage: adds " + NODE_LOCAL_CHECKPOINT_OVERRIDE)
    parser.add_argument("--dry-run", action="store_true", help="print files and command; run nothing")


def _entry(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], LaunchPlan],
           argv: Sequence[str] | None) -> int:
    """Parse, build the plan, run it; a ConfigError prints ``prog: error: ...`` and returns 2,
    like argparse's own errors."""
    args = parser.parse_intermixed_args(argv)
    prog = parser.prog
    try:
        plan = build(args)
        return run_plan(plan, args.dry_run)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
