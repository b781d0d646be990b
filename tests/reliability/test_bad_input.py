"""Every bad input the attack found: exit 2 and one line naming the field (or file and row) and what
is allowed, before the model loads."""
import json
import os

import pytest

from fault_common import run_tree
from helpers import make_model_dir, make_sentiment_data, write_yaml
from sparse_ft.cli import main


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the base model's weights would be loaded."""
    import sparse_ft.training.trainer as trainer

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(trainer, "load_model", refuse)


def run_cli(capsys, cfg, *overrides):
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(["train", "--config", str(cfg), *overrides])
    return code, capsys.readouterr().err.strip().splitlines()


CONFIG_CASES = {
    "target_modules-empty": (["method.target_modules=[]"], r"method.target_modules = \[\]; allowed: a non-empty list"),
    "lr-nan": (["train.lr=.nan"], r"train.lr = nan; allowed: a finite number"),
    "lr-inf": (["train.lr=.inf"], r"train.lr = inf; allowed: a finite number"),
    "lr-nan-string": (["train.lr=nan"], r"train.lr = nan; allowed: a finite number"),
    "max_grad_norm-nan": (["train.max_grad_norm=nan"], r"train.max_grad_norm = nan; allowed: a finite number"),
    "density-nan": (["method.density=nan"], r"method.density = nan"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_values(assets, tmp_path, capsys, no_model_load, case):
    import re

    overrides, pattern = CONFIG_CASES[case]
    cfg = write_yaml(tmp_path / "c.yaml", run_tree(assets, tmp_path / "out"))
    code, err = run_cli(capsys, cfg, *overrides)
    assert code == 2 and len(err) == 1 and re.search(pattern, err[0]), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated-json", "unknown-model_type"])
def test_corrupt_model_config(assets, tmp_path, capsys, no_model_load, damage):
    model = make_model_dir(tmp_path / "model")
    config_file = model / "config.json"
    if damage == "truncated-json":
        config_file.write_text(config_file.read_text()[:40])
    else:
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "nosuchmodel"}))
    tree = run_tree(assets, tmp_path / "out")
    tree["model"]["name_or_path"] = str(model)
    code, err = run_cli(capsys, write_yaml(tmp_path / "c.yaml", tree))
    assert code == 2 and len(err) == 1 and "model.name_or_path: " in err[0] and str(config_file) in err[0], err
    assert ("not valid JSON" if damage == "truncated-json" else "nosuchmodel") in err[0]


ROW_CASES = {"missing-label": ({"sentence": "good"}, "missing column 'label' needed by task 'sst2'"),
             "label-out-of-range": ({"sentence": "good", "label": 2}, "label 2; allowed for task 'sst2': 0..1"),
             "label-minus-one": ({"sentence": "good", "label": -1}, "label -1; allowed for task 'sst2': an integer >= 0")}


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_a_later_bad_row_names_file_and_line(assets, tmp_path, capsys, no_model_load, case, split):
    data = make_sentiment_data(tmp_path / "data", 96, 32)
    path = data / "sst2" / f"{split}.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(20, json.dumps(ROW_CASES[case][0]))  # line 21, far from the first row
    path.write_text("\n".join(lines) + "\n")
    tree = run_tree(assets, tmp_path / "out")
    tree["task"]["data_dir"] = str(data)
    code, err = run_cli(capsys, write_yaml(tmp_path / "c.yaml", tree))
    err = [line for line in err if line.strip() and not line.startswith("Generating ")]  # datasets' progress bars
    assert code == 2 and len(err) == 1, err
    assert str(path) in err[0] and "row 21" in err[0] and ROW_CASES[case][1] in err[0], err


def test_output_dir_is_a_file(assets, tmp_path, capsys, no_model_load):
    target = tmp_path / "out"
    target.write_text("my notes")
    code, err = run_cli(capsys, write_yaml(tmp_path / "c.yaml", run_tree(assets, target)))
    assert code == 2 and len(err) == 1 and f"train.output_dir = '{target}' is a file" in err[0], err
    assert target.read_text() == "my notes"


def test_output_dir_not_writable(assets, tmp_path, capsys, no_model_load, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o500)
    else:  # root writes anywhere: stand in for a read-only directory
        import sparse_ft.training.rundir as rundir

        real = os.access
        monkeypatch.setattr(rundir.os, "access", lambda p, m: False if str(p) == str(target) else real(p, m))
    try:
        code, err = run_cli(capsys, write_yaml(tmp_path / "c.yaml", run_tree(assets, target)))
    finally:
        target.chmod(0o700)
    assert code == 2 and len(err) == 1 and "is not writable" in err[0], err


@pytest.mark.parametrize("out", [".", "file"])
def test_export_out_is_file_or_dot(reference, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    code = main(["export", "--checkpoint", str(reference["out"]), "--out", out, "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and ("is a file" if out == "file" else "working directory") in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_truncated_delta_export_and_load(reference, tmp_path, capsys):
    import shutil

    delta = shutil.copy(reference["out"] / "delta.safetensors", tmp_path / "delta.safetensors")
    data = open(delta, "rb").read()
    open(delta, "wb").write(data[:len(data) // 2])
    code = main(["export", "--checkpoint", str(delta), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is truncated or not a safetensors file" in err[0], err
