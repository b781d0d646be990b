"""scripts/reproduce.py on a tiny in-line LLaMA and a tiny sentiment set: outputs, best-rate choice,
resuming, and crashed points."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from helpers import ROOT, make_model_dir, make_sentiment_data


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


R = load_reproduce()


def row(setting, lr, dev, test, status="ok", seed=0):
    return {"task": "sst2", "setting": setting, "method": "x", "lr": lr, "seed": seed, "status": status,
            "dev": dev, "test": test, "trainable": 10, "trainable_pct": 0.1}


def test_best_rate_follows_dev_not_test_and_skips_diverged():
    rows = [row("lora", 1e-4, 0.60, 0.90), row("lora", 1e-3, 0.80, 0.70),
            # Highest dev of all, but the loss went non-finite: never the best.
            row("lora", 1e-2, 0.95, 0.95, status="diverged"),
            # Two seeds at 1e-1 average to dev 0.75 < 0.80.
            row("rm0.1", 1e-1, 0.70, 0.5), row("rm0.1", 1e-1, 0.80, 0.7, seed=1), row("rm0.1", 1e-2, 0.72, 0.9)]
    summary = R.summarize(rows)
    assert summary[("sst2", "lora")]["best_lr"] == 1e-3
    assert summary[("sst2", "lora")]["curve"][1e-2]["dev"] is None
    assert summary[("sst2", "rm0.1")]["best_lr"] == 1e-1
    assert summary[("sst2", "rm0.1")]["curve"][1e-1]["test"] == pytest.approx(0.6)
    assert summary[("sst2", "lora")]["tied"] == []


def test_dev_ties_go_to_the_smaller_rate_and_are_shown():
    rows = [row("rm0.001", 1e-1, 0.65, 0.51), row("rm0.001", 1e-3, 0.65, 0.49), row("rm0.001", 1e-2, 0.60, 0.9)]
    grid = R.Grid(out=None, model="m", tasks=["sst2"], settings=["rm0.001"])
    summary = R.summarize(rows)
    assert summary[("sst2", "rm0.001")]["best_lr"] == 1e-3
    assert "49.0 (0.001; dev tied at 0.1)" in R.table_markdown(grid, summary)


def test_non_finite_loss_is_detected(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    assert not R.non_finite_losses(path)
    path.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n" + json.dumps({"step": 2, "loss": float("nan")}) + "\n")
    assert R.non_finite_losses(path)


@pytest.fixture
def one_thread():
    """One torch thread: several times faster than two on a CPU that other jobs share."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_grid_writes_outputs_picks_best_on_dev_and_resumes(tmp_path, monkeypatch, one_thread):
    model_dir = make_model_dir(tmp_path / "model", "llama")
    data_dir = make_sentiment_data(tmp_path / "data", n_train=200, n_val=64)
    out = tmp_path / "out"
    # Full fine-tuning of the tiny model learns this task in 16 steps at 3e-3 and not at 1e-6.
    grid = R.Grid(out=out, model=str(model_dir), data_dir=str(data_dir), tasks=["sst2"], settings=["full", "lora"],
                  lrs={"full": (3e-3, 1e-6), "lora": (1e-6, 5e-2)}, num_train=96, num_dev=48, num_test=64,
                  max_steps=16, max_length=32, precision="fp32")
    R.run_grid(grid)

    for name in ("table1.md", "all_points.csv", "lr_plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "lr_plot.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "all_points.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}

    full = {float(r["lr"]): r for r in rows if r["setting"] == "full"}
    dev = {lr: float(r["dev"]) for lr, r in full.items()}
    # The learnt rate must be clearly ahead on dev, so the choice below is not a tie-break.
    assert dev[3e-3] > dev[1e-6] + 0.2, dev
    table = (out / "table1.md").read_text()
    full_line = next(line for line in table.splitlines() if line.startswith("| Full fine-tuning"))
    assert f"{100 * float(full[3e-3]['test']):.1f} (0.003)" in full_line, full_line
    assert float(full[3e-3]["trainable_pct"]) == 100.0
    lora_line = next(line for line in table.splitlines() if line.startswith("| LoRA"))
    assert 0 < float(rows[-1]["trainable_pct"]) < 100 and "%)" in lora_line

    # A re-run reads every point back: training anything again would hit this stub.
    import sparse_ft.training.trainer as trainer_module

    class Boom:
        def __init__(self, run):
            raise RuntimeError("boom: this point was trained")

    monkeypatch.setattr(trainer_module, "Trainer", Boom)
    before = (out / "all_points.csv").read_text()
    R.run_grid(grid)
    assert (out / "all_points.csv").read_text() == before

    # A new rate whose training crashes is recorded as failed, not dropped, and never chosen.
    grid.lrs["full"] = (3e-3, 1e-6, 1.0)
    summary = R.run_grid(grid)
    with open(out / "all_points.csv") as f:
        failed = [r for r in csv.DictReader(f) if r["status"] == "failed"]
    assert [float(r["lr"]) for r in failed] == [1.0] and "boom" in failed[0]["error"]
    assert summary[("sst2", "full")]["best_lr"] == 3e-3
