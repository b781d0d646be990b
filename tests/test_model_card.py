"""Model cards in HF and PEFT exports parse with huggingface_hub's card loader and name the right
base model, method, scores and command; ``--push-to-hub`` without a reachable Hub fails in one line
before writing anything."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import sparse_ft
from sparse_ft.cli import main
from sparse_ft.methods import config_from_dict
from helpers import ROOT, make_model_dir

RESULTS = {"method": "random_mask: 410 trainable values", "test": {"accuracy": 0.8125, "n": 64},
           "dev": {"accuracy": 0.75, "n": 32}, "train_loss": 0.5}


def fake_run(tmp_path, method):
    """A run directory as training leaves it: delta, results.json, run_config.yaml."""
    from transformers import AutoModelForCausalLM

    base_dir = make_model_dir(tmp_path / "base", "llama")
    model = sparse_ft.apply(AutoModelForCausalLM.from_pretrained(str(base_dir)), config_from_dict(method))
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.add_(0.01)
    run = tmp_path / "run"
    sparse_ft.save_delta(model, run / "delta.safetensors", base_model=str(base_dir))
    (run / "results.json").write_text(json.dumps(RESULTS))
    (run / "run_config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base_dir)}, "method": method,
                                                         "task": {"name": "sst2"}}))
    n = sum(p.numel() for _, p in sparse_ft.trainable_parameters(model))
    return base_dir, run, n


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_card_parses_and_names_the_base(fmt, tmp_path, capsys):
    from huggingface_hub import ModelCard

    method = {"name": "random_mask", "density": 0.05, "target_modules": ["q_proj", "v_proj"]}
    base_dir, run, n_trainable = fake_run(tmp_path, method)
    args = ["export", "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--format", fmt]
    assert main(args) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == str(base_dir)
    assert card.data.library_name == ("peft" if fmt == "peft" else "transformers")
    assert "random_mask" in card.data.tags and card.data.datasets == ["sst2"]
    values = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {("test", "accuracy"): 0.8125, ("dev", "accuracy"): 0.75}
    assert "sparse-ft export " + " ".join(args[1:]) in card.text
    assert f"sparse-ft train --config {run / 'run_config.yaml'}" in card.text
    assert f"Trainable values: {n_trainable:,}" in card.text
    assert '"density": 0.05' in card.text
    assert ("PeftModel.from_pretrained" if fmt == "peft" else "AutoModelForCausalLM.from_pretrained") in card.text


def test_non_mergeable_export_card_keeps_the_loader_note(tmp_path):
    from huggingface_hub import ModelCard

    base_dir, run, _ = fake_run(tmp_path, {"name": "propetl", "prototype": "adapter", "bottleneck": 8})
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == str(base_dir)
    assert "Not a plain Hugging Face checkpoint" in card.text and "from load_model import load" in card.text


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"}],
                         ids=["offline", "unreachable"])
def test_push_without_hub_fails_in_one_line_and_writes_nothing(env, tmp_path):
    _, run, _ = fake_run(tmp_path, {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-m", "sparse_ft.cli", "export", "--checkpoint", str(run), "--out",
                          str(tmp_path / "out"), "--format", "peft", "--push-to-hub", "someone/tiny", "--private"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if "error" in l.lower()]
    assert len(lines) == 1 and "--push-to-hub someone/tiny" in lines[0] and "nothing was exported" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
