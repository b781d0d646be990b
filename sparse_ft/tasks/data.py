"""Loading rows (local jsonl or the hub) and MeZO-style seeded few-shot sampling.

Train and dev are drawn without overlap from the task's train split, test from its validation
split (the usual few-shot protocol where test labels are not public), each capped at what exists.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import ConfigError
from .base import Example, Task, TaskData


def local_split_file(data_dir: str | Path, task: Task, split: str) -> Path:
    """``<data_dir>/<task name>/<split>.jsonl``, or ``<data_dir>/<split>.jsonl`` for a task folder."""
    data_dir = Path(data_dir)
    nested = data_dir / task.name / f"{split}.jsonl"
    flat = data_dir / f"{split}.jsonl"
    return nested if nested.exists() or not flat.exists() else flat


def check_local_files(data_dir: str | Path, task: Task, need_test: bool = False) -> None:
    """Fail before anything loads when a needed data file is missing."""
    if not Path(data_dir).is_dir():
        raise ConfigError(f"task.data_dir = {str(data_dir)!r} is not a directory")
    splits = [task.train_split] + ([task.test_split] if need_test else [])
    for split in splits:
        path = local_split_file(data_dir, task, split)
        if not path.is_file():
            raise ConfigError(f"task.data_dir: missing data file {path} (expected {split}.jsonl for task "
                              f"{task.name!r}, in {data_dir}/{task.name}/ or {data_dir}/)")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
    return rows


def load_rows(task: Task, split: str, data_dir: str | None) -> list[dict] | None:
    """Rows of a split, or None when the split does not exist (local validation file absent)."""
    if data_dir:
        path = local_split_file(data_dir, task, split)
        if not path.is_file():
            return None
        rows = read_jsonl(path)
        source = path
    else:
        if task.hub_path is None:
            raise ConfigError(f"task {task.name!r} has no hub dataset; set task.data_dir to a folder with train.jsonl")
        import datasets

        rows = list(datasets.load_dataset(task.hub_path, task.hub_name, split=split))
        source = f"{task.hub_path}/{task.hub_name} split {split}"
    if rows:
        missing = [c for c in task.columns if c not in rows[0]]
        if missing:
            raise ConfigError(f"task {task.name!r}: rows of split {split!r} lack columns {missing}; "
                              f"the row has {sorted(rows[0])}")
    check_rows(task, rows, source)
    return rows


def _row_place(source: str | Path, i: int) -> str:
    """Row ``i`` (1-based, of the rows read) as ``file:line`` for a local file, else ``source: row i``."""
    if isinstance(source, Path):
        with open(source) as f:
            nonblank = (n for n, line in enumerate(f, 1) if line.strip())
            for _ in range(i - 1):
                next(nonblank, None)
            return f"{source}:{next(nonblank, '?')} (row {i})"
    return f"{source}: row {i}"


def check_rows(task: Task, rows: list[dict], source: str | Path) -> None:
    """Every row (not only the sampled ones, not only the first) has the task's columns and turns
    into examples whose labels index their options: a row that would fail later, or a label of -1
    that Python would read from the end of the option list, fails here naming file and row."""
    for i, row in enumerate(rows, 1):
        where = _Where(source, i)
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is {type(row).__name__}; allowed: a JSON object with {', '.join(task.columns)}")
        missing = [c for c in task.columns if c not in row]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}; task {task.name!r} needs {', '.join(task.columns)}")
        if "label" in task.columns:
            options = getattr(task, "verbalizer", None)
            n = len(options) if options is not None else None
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0 or (n is not None and label >= n):
                allowed = f"0..{n - 1}" if n is not None else "a non-negative integer"
                raise ConfigError(f"{where} has label {label!r}; allowed for task {task.name!r}: {allowed}")
        try:
            examples = task.examples(row)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where} cannot be read as a {task.name!r} example ({type(e).__name__}: {e})") from None
        for ex in examples:
            labels = ex.label if isinstance(ex.label, list) else [ex.label] if ex.label is not None else []
            if ex.options and any(not 0 <= int(lab) < len(ex.options) for lab in labels):
                raise ConfigError(f"{where} has label {ex.label!r}; allowed: 0..{len(ex.options) - 1} for its "
                                  f"{len(ex.options)} options")


class _Where:
    """Formats the place of a row only when an error message needs it."""

    def __init__(self, source, i):
        self.source, self.i = source, i

    def __format__(self, spec):
        return _row_place(self.source, self.i)


def _to_examples(task: Task, rows: list[dict]) -> list[Example]:
    out: list[Example] = []
    for row in rows:
        out.extend(task.examples(row))
    return out


def load_task_data(task: Task, data_dir: str | None, num_train: int, num_dev: int, num_test: int,
                   seed: int) -> TaskData:
    """Seeded few-shot splits: ``num_train`` + ``num_dev`` from train, ``num_test`` from validation.

    Without a validation split, test is taken from the train split as well (after train and dev).
    A negative count means "all that remain".
    """
    train_rows = load_rows(task, task.train_split, data_dir) or []
    if not train_rows:
        raise ConfigError(f"task {task.name!r}: the train split is empty")
    rng = random.Random(seed)
    order = list(range(len(train_rows)))
    rng.shuffle(order)

    def take(pool: list[int], count: int) -> tuple[list[int], list[int]]:
        count = len(pool) if count < 0 else min(count, len(pool))
        return pool[:count], pool[count:]

    train_idx, rest = take(order, num_train)
    dev_idx, rest = take(rest, num_dev)
    test_rows = load_rows(task, task.test_split, data_dir)
    if test_rows:
        test_order = list(range(len(test_rows)))
        random.Random(seed + 1).shuffle(test_order)
        test_sel = [test_rows[i] for i in take(test_order, num_test)[0]]
    else:
        test_sel = [train_rows[i] for i in take(rest, num_test)[0]]
    return TaskData(
        train=_to_examples(task, [train_rows[i] for i in train_idx]),
        dev=_to_examples(task, [train_rows[i] for i in dev_idx]),
        test=_to_examples(task, test_sel),
    )
