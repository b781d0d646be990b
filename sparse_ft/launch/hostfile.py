"""Hostfiles (``HOST slots=N`` lines, deepspeed/MPI style) and deepspeed's ``--include`` /
``--exclude`` resource filters.

The result of every reading comes from the deepspeed launcher's own functions
(``deepspeed.launcher.runner``), so our view of the hosts and slots cannot drift from what the
launcher will do; our own checks run first only to give each mistake a message that names the
line, host or slot (deepspeed's messages do not).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from deepspeed.launcher.runner import _parse_hostfile, apply_num_nodes_and_gpus, parse_inclusion_exclusion

from ..errors import ConfigError

_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S*)\s*(?:#.*)?$")


def parse_hostfile_text(text: str, source: str = "--hostfile") -> dict[str, int]:
    """``host slots=N`` per line (deepspeed/MPI style); ``#`` comments and blank lines allowed.

    Stricter than deepspeed's own parser, which ignores anything after ``slots=N`` and only fails
    at launch; here each problem names the line.
    """
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        match = _HOSTFILE_LINE.match(line)
        if not match:
            raise ConfigError(f"{where}: {line!r} does not parse; expected 'HOST slots=N' (e.g. 'worker-1 slots=8')")
        host, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise ConfigError(f"{where}: slots={slots!r} for host {host} is not a positive integer")
        if host in hosts:
            raise ConfigError(f"{where}: duplicate host {host} (already listed on line {first_line[host]})")
        hosts[host] = int(slots)
        first_line[host] = number
    if not hosts:
        raise ConfigError(f"{source}: no hosts found; expected lines like 'worker-1 slots=8'")
    try:
        parsed = _parse_hostfile(text.splitlines())
    except ValueError as e:  # a rule of deepspeed's that the checks above do not know yet
        raise ConfigError(f"{source}: {e}") from None
    return dict(parsed)


def read_hostfile(path: str | os.PathLike) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--hostfile: file {path} does not exist")
    return parse_hostfile_text(path.read_text(), source=f"--hostfile {path}")


def format_hostfile(hosts: Mapping[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def parse_resource_filter(spec: str, hosts: Mapping[str, int], flag: str) -> dict[str, list[int]]:
    """Check a deepspeed ``--include``/``--exclude`` value (``worker-0@worker-1:0,2``) against the
    hostfile and return host -> slots named (all slots when none are). The launcher passes the
    string on unchanged; this only makes its mistakes fail here, before anything starts, with a
    message naming the host or slot. :func:`active_slots` gives what deepspeed will use."""
    if not spec.strip():
        raise ConfigError(f"{flag} is empty; expected HOST[:SLOT[,SLOT...]][@HOST...] (e.g. worker-1:0,1)")
    chosen: dict[str, list[int]] = {}
    for node_spec in spec.split("@"):
        host, sep, slot_text = node_spec.partition(":")
        if not host:
            raise ConfigError(f"{flag} {spec!r}: empty host name; expected HOST[:SLOT[,SLOT...]][@HOST...]")
        if host not in hosts:
            raise ConfigError(f"{flag} {spec!r}: host {host} is not in the hostfile (hosts: {', '.join(hosts)})")
        if not sep:
            chosen[host] = list(range(hosts[host]))
            continue
        slots = []
        for item in slot_text.split(","):
            if not item.isdigit():
                raise ConfigError(f"{flag} {spec!r}: slot {item!r} of host {host} is not an integer; "
                                  f"expected e.g. {host}:0,1")
            if int(item) >= hosts[host]:
                raise ConfigError(f"{flag} {spec!r}: host {host} has no slot {item} "
                                  f"(the hostfile gives slots={hosts[host]}, so 0-{hosts[host] - 1})")
            slots.append(int(item))
        chosen[host] = sorted(set(chosen.get(host, []) + slots))
    return chosen


def active_slots(hosts: Mapping[str, int], include: str | None = None, exclude: str | None = None,
                 num_nodes: int | None = None, num_gpus: int | None = None) -> dict[str, list[int]]:
    """Host -> slots the deepspeed launcher will use, computed by its own functions
    (``parse_inclusion_exclusion`` and ``apply_num_nodes_and_gpus``, as ``deepspeed.launcher.runner.main``
    calls them), after our checks of each filter."""
    for flag, spec in (("--include", include), ("--exclude", exclude)):
        if spec is not None:
            parse_resource_filter(spec, hosts, flag)
    try:
        active = parse_inclusion_exclusion(dict(hosts), include or "", exclude or "")
    except ValueError as e:
        raise ConfigError(f"--include/--exclude: {e}") from None
    active = apply_num_nodes_and_gpus(active, num_nodes or -1, num_gpus or -1)
    return {host: list(slots) for host, slots in active.items()}
