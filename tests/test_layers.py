"""The package's layers (sparse_ft/__init__.py, docs/contributing.md) hold: `lint-imports` checks the
import-linter contracts in .importlinter (function-level imports included) and fails on an import back
up, e.g. a method module importing sparse_ft.training."""
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


def lint_imports(cwd):
    exe = shutil.which("lint-imports") or str(__import__("pathlib").Path(sys.executable).parent / "lint-imports")
    if not __import__("os").path.exists(exe):
        pytest.skip("import-linter is not installed (pip install -e '.[lint]')")
    return subprocess.run([exe, "--config", str(cwd / ".importlinter"), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(cwd)})


def test_import_contracts_are_kept():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_an_import_back_up_breaks_the_contracts(tmp_path):
    """A copy of the package where a method's layer imports the training package, inside a function
    (an import-time cycle dodge): lint-imports fails and names the line."""
    shutil.copytree(ROOT / "sparse_ft", tmp_path / "sparse_ft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    layer = tmp_path / "sparse_ft" / "methods" / "lora" / "layer.py"
    layer.write_text(layer.read_text() + "\n\ndef _up():\n    from sparse_ft import training  # noqa: F401\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "sparse_ft.methods.lora.layer -> sparse_ft.training (l." in out.stdout, out.stdout[-3000:]
