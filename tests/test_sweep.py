"""``sparse-ft sweep``: a real tiny-model grid in child processes (tables, plot, a diverging rate, the
right best rate, re-runs that skip finished points), the aggregation on results with known answers,
``--print-commands``, and bad input."""
import csv
import json
import math
import shlex

import pytest

from sparse_ft import sweep as sweep_mod
from sparse_ft.cli import main as cli_main
from helpers import base_run_tree, make_model_dir, make_sentiment_data, write_yaml


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    return {"llama": make_model_dir(tmp / "llama", "llama"), "opt": make_model_dir(tmp / "opt", "opt"),
            "data": make_sentiment_data(tmp / "data", 160, 64)}


def write_config(assets, tmp_path, arch="llama", **train):
    tree = base_run_tree(assets[arch], assets["data"], tmp_path / "runs", **train)
    tree["task"].update(num_train=64, num_dev=64, num_test=32)
    return write_yaml(tmp_path / "cfg.yaml", tree)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_end_to_end(assets, tmp_path, monkeypatch):
    # 1e-6 is far too small to move the mask in 24 steps; 5e-2 learns the toy task; at 1e20 Adam's first
    # step (about lr in size) overflows OPT's activations, LayerNorm turns them into NaN and the guard
    # stops the run after 2 bad steps.
    cfg = write_config(assets, tmp_path, "opt", epochs=3, max_bad_steps=2)
    out = tmp_path / "sweep"
    lrs = ["--lr", "1e-6,5e-2,1e20"]
    assert cli_main(["sweep", "--config", str(cfg), *lrs, "--out", str(out)]) == 0

    rows = read_csv(out / "results.csv")
    assert [(r["lr"], r["status"]) for r in rows] == [("1e-06", "ok"), ("0.05", "ok"), ("1e+20", "diverged")]
    assert all(r["setting"] == "random_mask d=0.05" for r in rows)
    small, good, big = rows
    assert float(good["dev_accuracy"]) > float(small["dev_accuracy"]) + 0.1, rows
    assert big["dev_accuracy"] == "" and "non-finite" in big["note"]
    diverged = json.loads((out / "random_mask-d0.05" / "lr1e+20-seed0" / "diverged.json").read_text())
    assert diverged["consecutive_bad_steps"] == 2

    summary = read_csv(out / "summary.csv")
    best = [r for r in summary if r["best"] == "1"]
    assert len(best) == 1 and best[0]["lr"] == "0.05" and best[0]["chosen_on"] == "dev"
    md = (out / "results.md").read_text()
    assert "| random_mask d=0.05 | 0.05 | dev |" in md
    assert "| random_mask d=0.05 | 1e+20 | 0 | diverged |" in md
    assert (out / "lr_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run starts no training: every point finished; the tables are written again.
    monkeypatch.setattr(sweep_mod, "run_point", lambda *a: pytest.fail("a finished point was re-run"))
    (out / "results.csv").unlink()
    assert cli_main(["sweep", "--config", str(cfg), *lrs, "--out", str(out)]) == 0
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["ok", "ok", "diverged"]


def fake_runner(calls, fail=()):
    """Stands in for a training process. Test accuracy peaks (0.9) at lr 1e-2 for density 1e-2 and at
    lr 1e-1 for density 1e-3, falls 0.1 per decade away from it, plus 0.01 * seed; dev is 0.05 above
    test; lr >= 1 diverges; the (density, lr, seed) points in ``fail`` crash."""

    def run_point(point, launcher):
        cfg = point.config
        lr, seed, density = cfg["train"]["lr"], cfg["train"]["seed"], cfg["method"].get("density", 1.0)
        calls.append((density, lr, seed))
        if (density, lr, seed) in fail:
            (point.dir / "train.log").write_text("Traceback ...\nRuntimeError: out of memory\n")
            return 1
        if lr >= 1:
            (point.dir / "diverged.json").write_text(json.dumps({"step": 3, "bad_steps": 2, "reason": "non-finite loss"}))
            return 3
        best_log_lr = -math.log10(density) - 4  # sparser wants a larger rate, as in paper 002
        test = 0.9 - 0.1 * abs(math.log10(lr) - best_log_lr) + 0.01 * seed
        (point.dir / "results.json").write_text(json.dumps({"test": {"accuracy": test}, "dev": {"accuracy": test + 0.05},
                                                            "bad_steps": 0}))
        return 0

    return run_point


def test_aggregation_mean_std_best_and_retry(assets, tmp_path, monkeypatch):
    cfg = write_config(assets, tmp_path)
    out = tmp_path / "sweep"
    calls = []
    monkeypatch.setattr(sweep_mod, "run_point", fake_runner(calls, fail={(1e-2, 1e-3, 1)}))
    args = ["sweep", "--config", str(cfg), "--lr", "1e-3,1e-2,1e-1,1", "--density", "1e-2,1e-3", "--seeds", "0,1",
            "--out", str(out), "train.epochs=1"]
    assert cli_main(args) == 1  # one point failed: tables written, exit code 1
    assert len(calls) == 16
    rows = read_csv(out / "results.csv")
    assert len(rows) == 16
    statuses = {(r["setting"], r["lr"], r["seed"]): r["status"] for r in rows}
    assert statuses[("random_mask d=0.01", "0.001", "1")] == "failed"
    assert [statuses[("random_mask d=0.001", "1.0", s)] for s in "01"] == ["diverged", "diverged"]
    assert sum(s == "ok" for s in statuses.values()) == 16 - 1 - 4
    failed = next(r for r in rows if r["status"] == "failed")
    assert "exit code 1" in failed["note"] and "out of memory" in failed["note"]

    summary = {(r["setting"], r["lr"]): r for r in read_csv(out / "summary.csv")}
    cell = summary[("random_mask d=0.001", "0.01")]
    # test = 0.8 + 0.01 * seed for seeds 0, 1: mean 0.805, sample std 0.00707.
    assert float(cell["test_accuracy_mean"]) == pytest.approx(0.805)
    assert float(cell["test_accuracy_std"]) == pytest.approx(0.01 / math.sqrt(2))
    assert (cell["n_ok"], cell["n_diverged"], cell["n_failed"]) == ("2", "0", "0")
    assert summary[("random_mask d=0.01", "0.001")]["n_failed"] == "1"
    best = {s: r["lr"] for (s, _), r in summary.items() if r["best"] == "1"}
    assert best == {"random_mask d=0.01": "0.01", "random_mask d=0.001": "0.1"}
    assert {r["chosen_on"] for r in summary.values() if r["best"] == "1"} == {"dev"}
    assert (out / "lr_sweep.png").is_file()
    md = (out / "results.md").read_text()
    assert "| random_mask d=0.001 | 0.1 | dev | 0.9550 ± 0.0071 | 0.9050 ± 0.0071 | 2/2 |" in md

    # Re-running retries only the failed point.
    calls.clear()
    monkeypatch.setattr(sweep_mod, "run_point", fake_runner(calls))
    assert cli_main(args) == 0
    assert calls == [(1e-2, 1e-3, 1)]
    assert all(r["status"] in ("ok", "diverged") for r in read_csv(out / "results.csv"))

    # Changing the grid's settings under finished points is refused rather than mixed into one table.
    with _raises_config("--out"):
        sweep_mod.sweep(str(cfg), [1e-3], out, densities=[1e-2], seeds=[0], overrides=["train.epochs=2"])


def _raises_config(match):
    from sparse_ft.errors import ConfigError

    return pytest.raises(ConfigError, match=match)


def test_dev_less_runs_are_chosen_on_test(assets, tmp_path, monkeypatch):
    def run_point(point, launcher):
        lr = point.config["train"]["lr"]
        (point.dir / "results.json").write_text(json.dumps({"test": {"accuracy": 1 - abs(math.log10(lr) + 2) / 10}}))
        return 0

    monkeypatch.setattr(sweep_mod, "run_point", run_point)
    out = tmp_path / "sweep"
    sweep_mod.sweep(str(write_config(assets, tmp_path)), [1e-3, 1e-2, 1e-1], out, methods=["lora"])
    best = [r for r in read_csv(out / "summary.csv") if r["best"] == "1"]
    assert [(b["setting"], b["lr"], b["chosen_on"]) for b in best] == [("lora", "0.01", "test")]


def test_print_commands(assets, tmp_path, capsys):
    cfg = write_config(assets, tmp_path)
    out = tmp_path / "sweep"
    launcher = "deepspeed --num_gpus 8 launch/train.py"
    assert cli_main(["sweep", "--config", str(cfg), "--lr", "1e-2,1e-1", "--method", "random_mask,lora",
                     "--seeds", "0,1", "--out", str(out), "--print-commands", "--launcher", launcher]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    for line in lines:
        argv = shlex.split(line)
        assert argv[:4] == shlex.split(launcher) and argv[4] == "--config"
        point = sweep_mod.yaml.safe_load(open(argv[5]))
        assert point["train"]["output_dir"].startswith(str(out)) and point["train"]["resume_from"] == "latest"
    lora = sweep_mod.yaml.safe_load(open(out / "lora" / "lr0.1-seed1" / "sweep_point.yaml"))
    assert lora["method"]["name"] == "lora" and lora["method"]["seed"] == 1 and lora["train"]["seed"] == 1
    assert lora["method"]["target_modules"] == ["q_proj", "v_proj"] and lora["train"]["lr"] == 0.1
    # --collect afterwards: nothing ran yet, every point pending, the tables still written.
    assert cli_main(["sweep", "--config", str(cfg), "--lr", "1e-2,1e-1", "--method", "random_mask,lora",
                     "--seeds", "0,1", "--out", str(out), "--collect"]) == 0
    assert {r["status"] for r in read_csv(out / "results.csv")} == {"pending"}


@pytest.mark.parametrize("args,flag", [
    (["--lr", "1e-2,abc"], "--lr"),
    (["--lr", "1e-2,,1e-3"], "--lr"),
    (["--lr=-1e-2"], "--lr"),
    (["--lr", "1e-2", "--seeds", "0,x"], "--seeds"),
    (["--lr", "1e-2", "--method", "lora", "--density", "1e-3"], "--density"),
    (["--lr", "1e-2", "--density", "2"], "--density"),
    (["--lr", "1e-2", "--method", "loraa"], "--method"),
    (["--lr", "1e-2", "--config", "missing.yaml"], "--config"),
    (["--lr", "1e-2", "train.lrr=3"], "train.lrr"),
])
def test_bad_input_names_the_flag(assets, tmp_path, capsys, args, flag):
    cfg = write_config(assets, tmp_path)
    argv = ["sweep", "--config", str(cfg), "--out", str(tmp_path / "sweep"), *args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-ft sweep: error: ") and flag in err, err
    assert not (tmp_path / "sweep" / "results.csv").exists()
