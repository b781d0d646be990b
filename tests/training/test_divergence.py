"""The divergence guard: a non-finite loss or gradient skips the step without touching what trains or
the optimizer state, and enough of them in a row stop the run with diverged.json and exit code 3,
keeping the last good checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sparse_ft.cli import main as cli_main
from sparse_ft.config import load_config
from sparse_ft.training import checkpoint as ckpt
from sparse_ft.training.data import BatchPlan
from sparse_ft.training.guard import EXIT_DIVERGED
from sparse_ft.training.trainer import Trainer
from helpers import InfGrad, base_run_tree, make_model_dir, make_sentiment_data, write_yaml


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    return {"model": make_model_dir(tmp / "llama", "llama"), "data": make_sentiment_data(tmp / "data", 96, 32)}


def write(assets, tmp_path, name, zero="zero0", **train):
    tree = base_run_tree(assets["model"], assets["data"], tmp_path / name, **train)
    tree["task"].update(num_train=96, num_test=16)
    tree["deepspeed"]["config"] = zero
    return write_yaml(tmp_path / f"{name}.yaml", tree)


def poison(monkeypatch, bad_calls: set[int], kind: str) -> None:
    """Make the given (1-based) forward calls non-finite: with grad_accum 1, those optimizer steps."""
    real = Trainer._forward
    calls = [0]

    def forward(self, batch):
        calls[0] += 1
        loss = real(self, batch)
        if calls[0] in bad_calls:
            return loss * float("nan") if kind == "loss" else InfGrad.apply(loss)
        return loss

    monkeypatch.setattr(Trainer, "_forward", forward)


def run(cfg) -> Trainer:
    trainer = Trainer(load_config(cfg))
    trainer.results = trainer.run()
    return trainer


def optimizer_state(trainer: Trainer) -> list[dict]:
    # The client AdamW holds the fp32 values' state under every ZeRO stage (ZeRO-2/3: keyed by flat
    # partitions, which ZeRO-3 puts into param_groups only while it steps them).
    return list(trainer.optimizer.state.values())


def metric_rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero,kind,accum", [("zero0", "loss", 1), ("zero0", "grad", 1), ("zero2", "grad", 1),
                                             ("zero3", "loss", 1), ("zero0", "grad", 2)])
def test_skipped_step_equals_a_run_without_it(assets, tmp_path, monkeypatch, zero, kind, accum):
    from transformers.integrations import deepspeed as hf_ds

    from sparse_ft.training import model as model_mod

    # A ZeRO-3 run leaves transformers' HfDeepSpeedConfig pointer set; restore it for the later tests.
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", hf_ds._hf_deepspeed_config_weak_ref)
    monkeypatch.setattr(model_mod, "_live_hf_ds_configs", [])
    bad = 3
    # The run without the bad step: 5 steps, whose plan never serves the batch of step 3.
    real_plan = BatchPlan.micro_batches
    monkeypatch.setattr(BatchPlan, "micro_batches",
                        lambda self, step, rank: real_plan(self, step + (step >= bad - 1), rank))
    ref = run(write(assets, tmp_path, "ref", zero, max_steps=5, grad_accum=accum, micro_batch_size=8 // accum))
    monkeypatch.setattr(BatchPlan, "micro_batches", real_plan)
    # The guarded run: 6 steps, step 3 non-finite (with accumulation: its first micro-batch, whose
    # gradient the second one's adds to).
    poison(monkeypatch, {(bad - 1) * accum + 1}, kind)
    guarded = run(write(assets, tmp_path, "guarded", zero, max_steps=6, grad_accum=accum,
                        micro_batch_size=8 // accum))

    assert guarded.results["bad_steps"] == 1 and ref.results["bad_steps"] == 0
    da, db = load_file(str(tmp_path / "ref" / "delta.safetensors")), load_file(str(tmp_path / "guarded" / "delta.safetensors"))
    assert da.keys() == db.keys() and any("values" in k for k in da)
    for k in da:
        assert torch.equal(da[k], db[k]), k
    sa, sb = optimizer_state(ref), optimizer_state(guarded)
    assert len(sa) == len(sb) > 0
    for a, b in zip(sa, sb):
        assert a.keys() == b.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert float(b["step"]) == 5  # AdamW's own count (its bias correction) did not see the skipped step
        for key in a:
            assert torch.equal(a[key], b[key]), key
    rows = [r for r in metric_rows(tmp_path / "guarded") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["skipped"] == ("non-finite loss" if kind == "loss" else "non-finite gradient")
    assert rows[2]["bad_steps"] == 1 and rows[-1]["bad_steps"] == 1 and "skipped" not in rows[3]
    assert guarded.scheduler.last_epoch == 6  # the schedule moved on through the skipped step
    assert not (tmp_path / "guarded" / "diverged.json").exists()


def test_consecutive_bad_steps_stop_the_run(assets, tmp_path, monkeypatch, capsys):
    # Steps 5, 6, 7 are bad; a checkpoint every 2 steps; 3 in a row stop the run at step 7.
    poison(monkeypatch, set(range(5, 100)), "loss")
    cfg = write(assets, tmp_path, "out", max_steps=12, save_every=2, max_bad_steps=3, lr=0.05)
    assert cli_main(["train", "--config", str(cfg)]) == EXIT_DIVERGED
    out = tmp_path / "out"
    record = json.loads((out / "diverged.json").read_text())
    assert record["step"] == 7 and record["consecutive_bad_steps"] == 3 and record["bad_steps"] == 3
    assert record["lr"] == pytest.approx(0.05) and record["reason"] == "non-finite loss"
    assert "step 7" in record["message"] and "lower learning rate" in record["message"]
    assert "train.lr=0.005" in record["message"]
    # The last good checkpoint (step 4) is `latest`; step 6, a skipped step, wrote none.
    root = out / "checkpoints"
    assert ckpt.list_checkpoints(root) == ["step-000002", "step-000004"]
    assert ckpt.read_latest(root) == root / "step-000004"
    assert record["last_checkpoint"] == str(root / "step-000004")
    delta = load_file(str(root / "step-000004" / "delta.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in delta.items() if t.is_floating_point())
    assert not (out / "results.json").exists() and not (out / "delta.safetensors").exists()
    rows = metric_rows(out)
    assert [r["step"] for r in rows if "skipped" in r] == [5, 6, 7]
    assert rows[-1]["diverged"] is True
    # A rerun in the same directory from the last good checkpoint with a lower rate clears diverged.json.
    monkeypatch.undo()
    assert cli_main(["train", "--config", str(cfg), "train.resume_from=latest", "train.lr=0.01"]) == 0
    assert not (out / "diverged.json").exists() and (out / "results.json").is_file()


def test_isolated_bad_steps_do_not_stop(assets, tmp_path, monkeypatch):
    poison(monkeypatch, {2, 4, 6}, "grad")
    trainer = run(write(assets, tmp_path, "out", max_steps=8, max_bad_steps=2))
    assert trainer.results["bad_steps"] == 3 and trainer.results["steps"] == 8
    assert not (tmp_path / "out" / "diverged.json").exists()


def test_max_bad_steps_is_validated(assets, tmp_path):
    from sparse_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="train.max_bad_steps"):
        load_config(write(assets, tmp_path, "out"), ["train.max_bad_steps=-1"])


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_ranks_agree_to_skip(assets, tmp_path, zero):
    """Only rank 1 sees the infinite gradient of step 3; both ranks skip it (the flag is all-reduced),
    and the result equals two ranks trained without that step's batch."""
    from helpers import ROOT, run_deepspeed

    check = ROOT / "tests" / "dist" / "guard_check.py"
    reports = {}
    for name, flag, steps in (("ref", "--drop-step", 4), ("guarded", "--poison-step", 5)):
        tree = base_run_tree(assets["model"], assets["data"], tmp_path / name, max_steps=steps, micro_batch_size=4)
        tree["task"].update(num_train=96, num_test=16)
        tree["deepspeed"]["config"] = zero
        cfg = write_yaml(tmp_path / f"{name}.yaml", tree)
        run_deepspeed(check, ["--config", str(cfg), "--report", str(tmp_path / f"{name}-RANK.pt"), flag, "3"])
        reports[name] = [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=False) for r in (0, 1)]
    for ref, guarded in zip(reports["ref"], reports["guarded"]):
        assert guarded["results"]["bad_steps"] == 1 and ref["results"]["bad_steps"] == 0
        assert len(ref["state"]) == len(guarded["state"]) > 0
        for a, b in zip(ref["state"], guarded["state"]):
            assert float(b["step"]) == 4
            assert all(torch.equal(a[k], b[k]) for k in a)
    da, db = load_file(str(tmp_path / "ref" / "delta.safetensors")), load_file(str(tmp_path / "guarded" / "delta.safetensors"))
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
