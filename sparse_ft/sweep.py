"""``sparse-ft sweep``: a learning-rate grid (x densities or methods x seeds) of training runs, and
the tables and plot that pick the best rate per setting.

    sparse-ft sweep --config X.yaml --lr 1e-1,1e-2,1e-3,1e-4 --density 1e-3,1e-4 --seeds 0,1,2

Each point of the grid is an ordinary training run in its own directory,
``<out>/<setting>/lr<lr>-seed<seed>/``, from a complete config the sweep writes there
(``sweep_point.yaml``). Points run one after another, each in its own process, so a crash or a
divergence stops only that point; ``--print-commands`` prints one command per point instead, to
submit as separate jobs. Running the sweep again skips the points that finished (ok or diverged),
retries the others (resuming from their last checkpoint), then writes ``results.csv``,
``summary.csv``, ``results.md`` and ``lr_sweep.png`` in ``<out>``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import from_dict, load_config, parse_overrides, set_dotted
from .errors import ConfigError
from .methods import METHODS
from .tasks import get_task

STATUSES = ("ok", "diverged", "failed", "pending")
POINT_CONFIG = "sweep_point.yaml"
DEFAULT_LAUNCHER = "sparse-ft train"
LOWER_IS_BETTER = {"loss", "perplexity"}
logger = logging.getLogger("sparse_ft")


# -- the grid ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One line of the plot: a method, and its density where it has one."""

    method: str
    density: float | None

    @property
    def label(self) -> str:
        return self.method if self.density is None else f"{self.method} d={self.density:g}"

    @property
    def dirname(self) -> str:
        return self.method if self.density is None else f"{self.method}-d{self.density:g}"


@dataclass(frozen=True)
class Point:
    """One training run of the sweep."""

    setting: Setting
    lr: float
    seed: int
    dir: Path
    config: dict
    """The complete run config (``RunConfig.to_dict()``), as written to ``sweep_point.yaml``."""

    @property
    def config_path(self) -> Path:
        return self.dir / POINT_CONFIG

    @property
    def name(self) -> str:
        return f"{self.setting.label} lr={self.lr:g} seed={self.seed}"


@dataclass
class PointResult:
    """What a point's directory says about it."""

    point: Point
    status: str
    """ok (results.json), diverged (diverged.json), failed (neither, after running), pending
    (not run yet; only with ``--collect``)."""

    dev: float | None = None
    """The dev metric of the final evaluation, where the run has a dev split."""

    test: float | None = None
    """The test metric of the final evaluation."""

    bad_steps: int | None = None
    """Optimizer steps the divergence guard skipped."""

    note: str = ""
    """Why a point diverged or failed, in a few words."""


def parse_list(flag: str, text: str | None, kind: type) -> list | None:
    """``"1e-1,1e-2"`` -> ``[0.1, 0.01]``; a message naming ``flag`` for anything else."""
    if text is None:
        return None
    example = {float: "1e-1,1e-2,1e-3", int: "0,1,2", str: "random_mask,lora"}[kind]
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise ConfigError(f"{flag} {text!r}: give a comma-separated list without empty items, e.g. {example}")
    out = []
    for t in items:
        try:
            value = kind(t)
        except ValueError:
            raise ConfigError(f"{flag}: {t!r} is not {'a number' if kind is float else 'an integer'}; "
                              f"give a comma-separated list such as {example}") from None
        if kind is float and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag}: {t!r}; allowed: positive numbers, e.g. {example}")
        out.append(value)
    if len(set(out)) != len(out):
        raise ConfigError(f"{flag} {text!r} repeats a value")
    return out


def _method_fields(name: str) -> set[str]:
    if name not in METHODS:
        raise ConfigError(f"--method: {name!r} is not a method; allowed: {', '.join(sorted(METHODS))}")
    return {f.name for f in dataclasses.fields(METHODS[name])}


def _method_section(file_section: dict, name: str) -> dict:
    """The file's method section for its own method; for another method, that method's defaults plus
    the file's keys it also has (target_modules, seed...)."""
    if file_section.get("name", "random_mask") == name:
        return copy.deepcopy(file_section)
    fields = _method_fields(name)
    return {"name": name, **{k: copy.deepcopy(v) for k, v in file_section.items() if k in fields}}


def read_tree(config: str, overrides: list[str]) -> dict:
    """The config file as a tree with the ``key=value`` overrides applied (validated as a whole first,
    so a bad file or key fails here, before any point)."""
    load_config(config, overrides)
    tree = yaml.safe_load(Path(config).read_text()) or {}
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    return tree


def build_points(tree: dict, lrs: list[float], out: Path, densities: list[float] | None = None,
                 methods: list[str] | None = None, seeds: list[int] | None = None) -> list[Point]:
    """Every (setting, lr, seed) as a validated run config with its own output directory."""
    file_method = dict(tree.get("method") or {"name": "random_mask"})
    methods = methods or [file_method.get("name", "random_mask")]
    for m in methods:
        fields = _method_fields(m)
        if densities is not None and "density" not in fields:
            raise ConfigError(f"--density: method {m!r} has no density (sweep densities with random_mask, "
                              "and other methods in a separate sweep)")
    points = []
    for m in methods:
        section = _method_section(file_method, m)
        for density in densities or [None]:
            msec = dict(section)
            if density is not None:
                if density > 1:
                    raise ConfigError(f"--density: {density:g}; allowed: (0, 1]")
                msec["density"] = density
            for lr in lrs:
                for seed in seeds or [None]:
                    t = copy.deepcopy(tree)
                    t["method"] = copy.deepcopy(msec)
                    t.setdefault("train", {})
                    if seed is not None:
                        # The seed varies all of a run's randomness: data order, and the method's draws
                        # (mask positions, initialisation). The few-shot sample (task.seed) stays fixed.
                        t["train"]["seed"] = seed
                        if "seed" in _method_fields(m):
                            t["method"]["seed"] = seed
                    t["train"]["lr"] = lr
                    try:
                        run = from_dict(t)
                    except ConfigError as e:
                        raise ConfigError(f"sweep point {m} lr={lr:g}: {e}") from None
                    fixed = [st.name for st in run.method.stages(run.train) if st.train.lr != lr]
                    if fixed and lr == lrs[0] and seed == (seeds or [None])[0]:
                        logger.warning("--lr sets train.lr, but %s stage(s) %s set their own lr, which the sweep "
                                       "does not change", m, ", ".join(fixed))
                    d = getattr(run.method, "density", None)
                    setting = Setting(m, float(d) if d is not None else None)
                    point_dir = (out / setting.dirname / f"lr{lr:g}-seed{run.train.seed}").resolve()
                    run.train.output_dir = str(point_dir)
                    # Each point keeps its checkpoints to itself and resumes them when retried.
                    run.train.checkpoint_dir = None
                    run.train.resume_from = "latest"
                    points.append(Point(setting, lr, run.train.seed, point_dir, run.to_dict()))
    dirs = [p.dir for p in points]
    if len(set(dirs)) != len(dirs):
        twice = next(d for d in dirs if dirs.count(d) > 1)
        raise ConfigError(f"--lr/--density/--seeds: two points of the grid would share {twice} (values that "
                          "differ beyond 6 significant digits); give distinct values")
    return points


# -- running --------------------------------------------------------------------------------------
def launcher_command(launcher: str, point: Point, for_display: bool = False) -> list[str]:
    if launcher == DEFAULT_LAUNCHER and not for_display:
        # The same interpreter as the sweep: `sparse-ft` need not be on PATH.
        return [sys.executable, "-m", "sparse_ft.cli", "train", "--config", str(point.config_path)]
    return [*shlex.split(launcher), "--config", str(point.config_path)]


def write_point_config(point: Point) -> None:
    """Write ``sweep_point.yaml``; refuse when the point already finished under another config, so
    one table never mixes two settings."""
    path = point.config_path
    if path.is_file() and finished(point):
        old = yaml.safe_load(path.read_text()) or {}
        # Keys on one side only are ignored: a newer sparse-ft may add a field with a default.
        diff = sorted(f"{s}.{k}" for s, section in point.config.items() for k in section
                      if k in (old.get(s) or {}) and section[k] != old[s][k])
        if diff:
            raise ConfigError(f"--out: point {point.name} in {point.dir} finished with a different config "
                              f"({', '.join(diff)}); use another --out or delete that directory")
        return
    point.dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(point.config, sort_keys=False))
    os.replace(tmp, path)


def finished(point: Point) -> bool:
    return (point.dir / "results.json").is_file() or (point.dir / "diverged.json").is_file()


def run_point(point: Point, launcher: str) -> int:
    """Train one point in a child process, its output in ``train.log``; returns the exit code."""
    with open(point.dir / "train.log", "a") as log:
        proc = subprocess.run(launcher_command(launcher, point), stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode


def _metric(split: dict | None, metric: str) -> float | None:
    if not isinstance(split, dict):
        return None
    value = split.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def read_point(point: Point, metric: str, ran: bool = True) -> PointResult:
    res, div = point.dir / "results.json", point.dir / "diverged.json"
    if res.is_file():
        r = json.loads(res.read_text())
        return PointResult(point, "ok", _metric(r.get("dev"), metric), _metric(r.get("test"), metric),
                           r.get("bad_steps"))
    if div.is_file():
        d = json.loads(div.read_text())
        return PointResult(point, "diverged", bad_steps=d.get("bad_steps"),
                           note=f"{d.get('reason', 'non-finite')} at step {d.get('step')}")
    if not ran:
        return PointResult(point, "pending", note="not run yet")
    return PointResult(point, "failed", note=_failure_line(point.dir / "train.log"))


def _failure_line(log: Path) -> str:
    """The exception line of a failed run's log (progress bars write \\r-separated lines after it)."""
    if not log.is_file():
        return "no results.json or diverged.json"
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if re.search(r"(Error|Exception|error:)", l) and not l.startswith("File ")]
    line = (errors or lines or ["no results.json or diverged.json"])[-1]
    return re.sub(r"^\[rank\d+\]:\s*", "", line)[-200:]


# -- tables and plot ------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Cell:
    """All seeds of one (setting, lr)."""

    setting: Setting
    lr: float
    results: list[PointResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def values(self, split: str) -> list[float]:
        return [getattr(r, split) for r in self.results if r.status == "ok" and getattr(r, split) is not None]

    @property
    def eligible(self) -> bool:
        """A rate can be best only if some seed finished and none diverged."""
        return self.count("ok") > 0 and self.count("diverged") == 0


def summarize(results: list[PointResult], metric: str) -> tuple[list[Cell], dict[Setting, tuple[Cell, str]]]:
    """Cells in grid order, and per setting the best cell and the split it was chosen on: dev where
    every finished run of the setting has a dev metric, else test (the final evaluation)."""
    cells: dict[tuple[Setting, float], Cell] = {}
    for r in results:
        cells.setdefault((r.point.setting, r.point.lr), Cell(r.point.setting, r.point.lr, [])).results.append(r)
    best: dict[Setting, tuple[Cell, str]] = {}
    sign = -1 if metric in LOWER_IS_BETTER else 1
    for setting in dict.fromkeys(c.setting for c in cells.values()):
        mine = [c for c in cells.values() if c.setting == setting]
        ok = [r for c in mine for r in c.results if r.status == "ok"]
        split = "dev" if ok and all(r.dev is not None for r in ok) else "test"
        scored = [(sign * _mean_std(c.values(split))[0], c) for c in mine if c.eligible and c.values(split)]
        if scored:
            best[setting] = (max(scored, key=lambda sc: sc[0])[1], split)
    return list(cells.values()), best


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if n < 2 else f"{mean:.4f} ± {std:.4f}"


def write_tables(out: Path, results: list[PointResult], metric: str) -> tuple[list[Cell], dict]:
    cells, best = summarize(results, metric)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "density", "lr", "seed", "status", f"dev_{metric}", f"test_{metric}",
                    "bad_steps", "output_dir", "note"])
        for r in results:
            p = r.point
            w.writerow([p.setting.label, p.setting.method, "" if p.setting.density is None else p.setting.density,
                        p.lr, p.seed, r.status, "" if r.dev is None else r.dev, "" if r.test is None else r.test,
                        "" if r.bad_steps is None else r.bad_steps, str(p.dir), r.note])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "lr", *(f"n_{s}" for s in STATUSES), f"dev_{metric}_mean", f"dev_{metric}_std",
                    f"test_{metric}_mean", f"test_{metric}_std", "best", "chosen_on"])
        for c in cells:
            dm, ds = _mean_std(c.values("dev"))
            tm, ts = _mean_std(c.values("test"))
            is_best = best.get(c.setting, (None,))[0] is c
            w.writerow([c.setting.label, c.lr, *(c.count(s) for s in STATUSES),
                        *("" if v is None else v for v in (dm, ds, tm, ts)), int(is_best),
                        best[c.setting][1] if is_best else ""])

    lines = [f"# Learning-rate sweep: {metric}", "",
             "Best learning rate per setting, chosen on the mean over seeds of the split named in *chosen on* "
             "(dev where every finished run has a dev split, else test, the final evaluation). A rate where any "
             "seed diverged is not eligible.", "",
             f"| setting | best lr | chosen on | dev {metric} | test {metric} | seeds ok |", "|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(c.setting for c in cells):
        if setting not in best:
            lines.append(f"| {setting.label} | none (no rate finished without diverging) | - | - | - | - |")
            continue
        c, split = best[setting]
        lines.append(f"| {setting.label} | {c.lr:g} | {split} | {_fmt(*_mean_std(c.values('dev')), len(c.values('dev')))}"
                     f" | {_fmt(*_mean_std(c.values('test')), len(c.values('test')))} | {c.count('ok')}/{len(c.results)} |")
    lines += ["", f"## Mean ± std over seeds per (setting, lr)", "",
              f"| setting | lr | dev {metric} | test {metric} | ok | diverged | failed | pending | best |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        mark = "**best**" if best.get(c.setting, (None,))[0] is c else ""
        lines.append(f"| {c.setting.label} | {c.lr:g} | {_fmt(*_mean_std(c.values('dev')), len(c.values('dev')))} | "
                     f"{_fmt(*_mean_std(c.values('test')), len(c.values('test')))} | {c.count('ok')} | "
                     f"{c.count('diverged')} | {c.count('failed')} | {c.count('pending')} | {mark} |")
    lines += ["", "## Every run", "",
              f"| setting | lr | seed | status | dev {metric} | test {metric} | skipped steps | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {r.point.setting.label} | {r.point.lr:g} | {r.point.seed} | {r.status} | {cell(r.dev)} | "
                     f"{cell(r.test)} | {'-' if r.bad_steps is None else r.bad_steps} | {r.note.replace('|', '/')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return cells, best


def plot(out: Path, cells: list[Cell], best: dict, metric: str, title: str) -> Path:
    """``lr_sweep.png``: the metric against the learning rate (log x), one line per setting, error
    bars over seeds; diverged (x) and failed (square) rates marked along the bottom, the best rate
    starred. Plots the test metric (the final evaluation), or dev where a setting has no test."""
    import matplotlib  # optional (the `sweep` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bottom = ax.get_xaxis_transform()  # x in data, y in axes fraction
    settings = list(dict.fromkeys(c.setting for c in cells))
    lines = {}
    for i, setting in enumerate(settings):  # the lines first, so the legend lists them first
        mine = sorted((c for c in cells if c.setting == setting), key=lambda c: c.lr)
        split = "test" if any(c.values("test") for c in mine) else "dev"
        lines[setting] = (mine, split, f"C{i % 10}")
        pts = [(c.lr, *_mean_std(c.values(split))) for c in mine if c.values(split)]
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, color=f"C{i % 10}", marker="o", capsize=3, label=setting.label)
    marked = set()
    for setting, (mine, split, color) in lines.items():
        if setting in best and best[setting][0].values(split):
            c = best[setting][0]
            ax.plot([c.lr], [_mean_std(c.values(split))[0]], marker="*", markersize=15, color=color,
                    linestyle="none", label="best rate" if "best" not in marked else None)
            marked.add("best")
        for c in mine:
            for status, marker in (("diverged", "x"), ("failed", "s")):
                if c.count(status):
                    ax.plot([c.lr], [0.04], transform=bottom, marker=marker, markersize=9, color=color,
                            markerfacecolor="none" if marker == "s" else color, linestyle="none",
                            label=status if status not in marked else None)
                    marked.add(status)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"{metric} (test, mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    first = {s.label for s in settings}  # matplotlib lists error-bar lines after plain markers
    order = sorted(range(len(labels)), key=lambda i: labels[i] not in first)
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    fig.tight_layout()
    path = out / "lr_sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the command ----------------------------------------------------------------------------------
def sweep(config: str, lrs: list[float], out: Path | None = None, densities: list[float] | None = None,
          methods: list[str] | None = None, seeds: list[int] | None = None, overrides: list[str] = (),
          metric: str | None = None, launcher: str = DEFAULT_LAUNCHER, print_commands: bool = False,
          collect: bool = False, log=print) -> list[PointResult] | None:
    """Run (or print, or collect) the grid and write the tables and plot; returns every point's
    result, or None with ``print_commands``."""
    try:
        import matplotlib  # noqa: F401  (checked first: the plot comes after hours of training)
    except ImportError:
        raise ConfigError("sparse-ft sweep needs matplotlib for lr_sweep.png: pip install 'sparse-ft[sweep]'") from None
    tree = read_tree(config, list(overrides))
    base = from_dict(copy.deepcopy(tree))
    out = Path(out) if out is not None else Path(base.train.output_dir) / "sweep"
    metric = metric or get_task(base.task.name).metric
    points = build_points(tree, lrs, out, densities, methods, seeds)
    out.mkdir(parents=True, exist_ok=True)
    for p in points:
        write_point_config(p)

    if print_commands:
        todo = [p for p in points if not finished(p)]
        for p in todo:
            print(shlex.join(launcher_command(launcher, p, for_display=True)))
        print(f"# {len(todo)} of {len(points)} points to run; then `sparse-ft sweep` with the same arguments "
              "(or --collect) writes the tables", file=sys.stderr)
        return None

    results = []
    for i, p in enumerate(points, 1):
        if finished(p):
            r = read_point(p, metric)
            log(f"[{i}/{len(points)}] {p.name}: {r.status} (finished earlier)")
        elif collect:
            r = read_point(p, metric, ran=False)
        else:
            log(f"[{i}/{len(points)}] {p.name}: running in {p.dir}")
            code = run_point(p, launcher)
            r = read_point(p, metric)
            if r.status == "failed":
                r.note = f"exit code {code}: {r.note}"
            log(f"[{i}/{len(points)}] {p.name}: {r.status}" + (f" ({r.note})" if r.note else "")
                + (f", test {metric} {r.test:.4f}" if r.test is not None else ""))
        results.append(r)
    cells, best = write_tables(out, results, metric)
    title = f"{base.task.name}, {Path(base.model.name_or_path).name or base.model.name_or_path}"
    plot(out, cells, best, metric, title)
    for setting, (c, split) in best.items():
        log(f"best lr for {setting.label}: {c.lr:g} (chosen on {split} {metric})")
    log(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'lr_sweep.png'}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-ft sweep",
        description="Train a grid of learning rates (x densities or methods x seeds), one run per point, and "
                    "write results.csv, results.md and lr_sweep.png with the best rate per setting.")
    parser.add_argument("--config", required=True, help="the run's YAML config (every point starts from it)")
    parser.add_argument("--lr", required=True, help="comma-separated learning rates, e.g. 1e-1,1e-2,1e-3,1e-4")
    parser.add_argument("--density", default=None, help="comma-separated method.density values (methods that have one)")
    parser.add_argument("--method", default=None, help="comma-separated methods, e.g. random_mask,lora (default: the config's)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (train.seed and method.seed); default: the config's")
    parser.add_argument("--out", default=None, help="sweep directory (default: <train.output_dir>/sweep)")
    parser.add_argument("--metric", default=None, help="metric in results.json to compare (default: the task's, e.g. accuracy)")
    parser.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                        help="command that trains one point, given --config FILE (default: 'sparse-ft train'; "
                             "e.g. 'deepspeed --num_gpus 8 launch/train.py')")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true",
                      help="print one command per unfinished point (to submit as separate jobs) instead of running")
    mode.add_argument("--collect", action="store_true",
                      help="run nothing: write the tables from the points that finished (others: pending)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every point, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    if not args.launcher.strip():
        raise ConfigError("--launcher is empty")
    results = sweep(args.config, parse_list("--lr", args.lr, float), Path(args.out) if args.out else None,
                    parse_list("--density", args.density, float), parse_list("--method", args.method, str),
                    parse_list("--seeds", args.seeds, int), args.overrides, args.metric, args.launcher,
                    args.print_commands, args.collect)
    # Diverged points are results; a failed point (a crash) makes the exit code 1 after the tables are written.
    return 1 if results and any(r.status == "failed" for r in results) else 0
