"""Experiment trackers fed the same rows as ``metrics.jsonl`` (``train.report_to``).

A sink takes each row the trainer writes to ``metrics.jsonl`` (loss, lr, grad norm, skipped steps,
tokens/s, peak memory, every eval metric) and logs its numeric values; only rank 0 has sinks. A
row's ``step`` is its x value; a multi-stage method's rows carry ``stage``, which prefixes their tags
(each stage counts its steps from 0). The trackers are optional installs, checked when the config
is validated, before any model loads.

- ``tensorboard``: event files in ``<output_dir>/tensorboard`` (``torch.utils.tensorboard``);
- ``wandb``: a W&B run in ``<output_dir>/wandb``; ``WANDB_MODE=offline`` works with no network
  (sync later with ``wandb sync``);
- ``csv``: ``<output_dir>/metrics.csv`` with columns ``stage,step,name,value`` (one line per value,
  so rows with different keys share one file).
"""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

from ..errors import ConfigError

REPORT_TO = ("tensorboard", "wandb", "csv")
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def normalize_report_to(value) -> list[str]:
    """``train.report_to`` as a list: a YAML list, or a comma-separated string from an override;
    ``none`` / empty for no tracker."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"train.report_to = {value!r}; allowed: a list of {', '.join(REPORT_TO)} (or none)")
    return [v for v in value if v.lower() != "none"]


def check_report_to(value) -> list[str]:
    """Validate the tracker names and that each one's package is installed (one-line errors)."""
    names = normalize_report_to(value)
    for name in names:
        if name not in REPORT_TO:
            raise ConfigError(f"train.report_to: {name!r} is not a tracker; allowed: {', '.join(REPORT_TO)}")
        module, package = _PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name} needs the {package} package: pip install {package} "
                              "(or pip install 'sparse-ft[track]')")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to = {names} names a tracker twice")
    return names


def numeric_items(row: dict) -> dict[str, float]:
    """The row's loggable values under their tags: numbers only (strings such as ``skipped``'s
    reason are not plotted), ``<stage>/`` prefixed when the row has a stage."""
    stage = row.get("stage")
    out = {}
    for key, value in row.items():
        if key in ("step", "stage") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"{stage}/{key}" if stage else key] = float(value)
    return out


class Sink:
    """One tracker: ``log(row)`` per ``metrics.jsonl`` row, ``close()`` at the end."""

    def log(self, row: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    def __init__(self, log_dir: Path, run_name: str, config: dict, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run first drops events logged after its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        import yaml

        self.writer.add_text("run/config", f"```yaml\n{yaml.safe_dump(config, sort_keys=False)}\n```", 0)
        self.writer.add_text("run/name", run_name, 0)

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for tag, value in numeric_items(row).items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    def __init__(self, run_dir: Path, run_name: str, config: dict, resume: bool):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(dir=str(run_dir), name=run_name, config=config, id=run_id,
                              resume="allow" if run_id else None, reinit="create_new")
        id_file.write_text(self.run.id)
        # Every row's own step as the x axis (stages restart at 0, so not W&B's monotonic step).
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, row: dict) -> None:
        items = numeric_items(row)
        if items:
            self.run.log({"step": int(row.get("step", 0)), **items})

    def close(self) -> None:
        self.run.finish()


class CSVSink(Sink):
    def __init__(self, path: Path, keep: bool):
        new = not (keep and path.is_file())
        self.f = open(path, "w" if new else "a", newline="")
        self.writer = csv.writer(self.f)
        if new:
            self.writer.writerow(["stage", "step", "name", "value"])

    def log(self, row: dict) -> None:
        stage = row.get("stage", "")
        for key, value in row.items():
            if key not in ("step", "stage"):
                self.writer.writerow([stage, row.get("step", ""), key, value])
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def make_sinks(names: list[str], output_dir: Path, run_name: str | None, config: dict,
               resume_step: int | None = None) -> list[Sink]:
    """The sinks for ``train.report_to`` (call on rank 0 only). ``resume_step``: the run resumes
    from a checkpoint at this step."""
    output_dir = Path(output_dir)
    name = run_name or output_dir.resolve().name
    sinks: list[Sink] = []
    for tracker in names:
        if tracker == "tensorboard":
            sinks.append(TensorBoardSink(output_dir / "tensorboard", name, config,
                                         None if resume_step is None else resume_step + 1))
        elif tracker == "wandb":
            sinks.append(WandbSink(output_dir / "wandb", name, config, resume=resume_step is not None))
        elif tracker == "csv":
            sinks.append(CSVSink(output_dir / "metrics.csv", keep=resume_step is not None))
    return sinks
