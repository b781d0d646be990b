"""Shared pieces of the fault-injection suite: a tiny run, its reference (uninterrupted) outcome,
and comparisons that must hold bitwise after any interruption and resume."""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import base_run_tree, write_yaml

STEPS = 8


def run_tree(assets, out: Path, **train) -> dict:
    tree = base_run_tree(assets["model"], assets["data"], out, max_steps=STEPS, save_every=2, keep_last=2,
                         schedule="linear", warmup_steps=2, **train)
    tree["task"].update(num_train=64, num_test=32)
    return tree


def config(assets, tmp_path: Path, name: str = "run", **train) -> Path:
    return write_yaml(tmp_path / f"{name}.yaml", run_tree(assets, tmp_path / name, **train))


def loss_rows(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


def outcome(out: Path) -> dict:
    """What an uninterrupted run leaves: loss curve, delta tensors, results.json."""
    delta = load_file(str(out / "delta.safetensors"))
    return {"rows": loss_rows(out), "delta": delta, "results": json.loads((out / "results.json").read_text())}


def assert_same(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert a["delta"].keys() == b["delta"].keys()
    assert all(torch.equal(a["delta"][k], b["delta"][k]) for k in a["delta"])
    assert a["results"] == b["results"]


def no_temp_files(out: Path) -> list[str]:
    """Temporary files a write left behind (anything with .tmp / .partial- in its name, outside
    the checkpoint staging directory .partial/ which is overwritten on the next save)."""
    return [str(p) for p in out.rglob("*") if (".tmp" in p.name or ".partial-" in p.name)]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def unfinished_copy(reference, tmp_path: Path) -> Path:
    """The reference run as a kill during its final writes leaves it (no results.json, no delta)."""
    out = shutil.copytree(reference["out"], tmp_path / "run")
    (out / "results.json").unlink()
    (out / "delta.safetensors").unlink()
    return out
