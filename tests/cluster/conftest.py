"""The local two-node cluster of scripts/local_cluster.sh, for the tests marked ``cluster``.

They run only when asked for (``pytest -m cluster``; .ci/run does). As root the fixture starts the
cluster (installing its Debian packages first when they are missing and this is CI or
SPARSE_FT_CLUSTER_INSTALL=1) and stops every daemon it started at the end; otherwise the tests
skip with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "local_cluster.sh"


def pytest_collection_modifyitems(config, items):
    if "cluster" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="cluster tests run only with -m cluster (they start daemons as root)")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=check, timeout=900)


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.hostfile = state / "hostfile"
        self.local = state / "local"  # each node sees its own disk here

    def node_local(self, node: str) -> Path:
        """Where node ``node``'s ``self.local`` lies when seen from outside the node."""
        return self.state / node / "local"

    def env(self, **extra: str) -> dict[str, str]:
        import sys

        env = dict(os.environ)
        env.update(PATH=f"{self.state / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}",
                   SLURM_CONF=str(self.state / "slurm.conf"), GLOO_SOCKET_IFNAME="lo",
                   PYTHONPATH=str(ROOT), SPARSE_FT_CLUSTER=str(self.state), **extra)
        env.pop("DS_ENV_FILE", None)
        return env


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root (mount/UTS namespaces, sshd, slurmd)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    missing = _sh("missing").stdout.strip()
    if missing:
        if not (os.environ.get("CI") or os.environ.get("SPARSE_FT_CLUSTER_INSTALL")):
            pytest.skip(f"not installed: {missing} (run: sudo scripts/local_cluster.sh install)")
        _sh("install")
    state = Path(os.environ.get("SPARSE_FT_CLUSTER", "/tmp/sparse-ft-cluster"))
    already = "slurmctld: running" in _sh("status", check=False).stdout
    if not already:
        result = _sh("start", check=False)
        if result.returncode != 0:
            pytest.fail(f"scripts/local_cluster.sh start failed:\n{result.stdout}\n{result.stderr}")
    try:
        yield Cluster(state)
    finally:
        if not already:
            _sh("stop", check=False)
