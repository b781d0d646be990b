"""Hostfiles (``HOST slots=N`` lines, deepspeed/MPI style) and deepspeed's ``--include`` /
``--exclude`` resource filters."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

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
    return hosts


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
    string on unchanged; this only makes its mistakes fail here, before anything starts."""
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
