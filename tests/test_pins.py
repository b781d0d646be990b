"""Pinned, tested dependencies: README's set-up command and CI install the same way, both through
constraints.txt; every requirement pyproject.toml declares (dependencies and extras) is pinned there,
at a version inside pyproject's bounds; torch's pin is the version README's set-up names."""
import re
import shlex
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[normalize(name)] = version
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_declared_requirement_is_pinned_within_its_bounds():
    pinned = pins()
    for req in declared():
        name = normalize(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name} (pyproject.toml declares {req})"
        assert req.specifier.contains(Version(pinned[name]), prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req}"
    # The libraries whose internals sparse-ft touches carry an upper bound.
    bounded = {normalize(r.name) for r in declared() if any(s.operator in ("<", "<=", "~=") for s in r.specifier)}
    assert {"deepspeed", "transformers", "bitsandbytes", "peft"} <= bounded, bounded


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The ``pip install`` commands among ``commands``, as argument lists without ``python -m`` and
    ``-q`` (CI is quiet, README is not), leaving out pip upgrading itself."""
    out = []
    for command in commands:
        args = [a for a in shlex.split(command) if a != "-q"]
        if args[:3] == ["python", "-m", "pip"]:
            args = args[2:]
        if args[:2] == ["pip", "install"] and "--upgrade" not in args:
            out.append(args)
    return out


def test_readme_and_ci_install_alike():
    readme = (ROOT / "README.md").read_text()
    setup = next(l for l in readme.splitlines() if l.startswith("python3 -m venv") and "scripts/demo.py" in l)
    readme_installs = pip_installs([c.strip() for c in setup.split("&&")])
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_installs = pip_installs([l for l in ci_lines if "pip install" in l and not l.startswith("#")])
    assert readme_installs == ci_installs, (readme_installs, ci_installs)
    editable = [a for a in readme_installs if "-e" in a]
    assert editable and all("-c" in a and a[a.index("-c") + 1] == "constraints.txt" for a in editable), \
        f"README's set-up installs sparse-ft without -c constraints.txt: {editable}"
    torch = [a for args in readme_installs for a in args if a.startswith("torch==")]
    assert torch == [f"torch=={pins()['torch']}"], torch
