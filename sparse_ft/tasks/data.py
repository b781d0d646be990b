"""Loading rows through ``datasets.load_dataset`` and MeZO-style seeded few-shot sampling.

Rows come from one of (first that is set): local files (``task.data_files``: json, jsonl, parquet
or csv, a path, a glob or a split -> path mapping), a dataset (``task.dataset``: a hub id, a local
dataset directory or a folder saved with ``Dataset.save_to_disk``), a folder of per-split jsonl
files (``task.data_dir``, the built-in tasks' layout), or the built-in task's hub dataset.
``task.columns`` renames the user's columns to the names the task's template reads. Every row is
checked before training: a problem is reported with its file and row number.

Train and dev are drawn without overlap from the train split, test from the test split (the usual
few-shot protocol where test labels are not public), each capped at what exists.
"""
from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .base import Example, Task, TaskData

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataSource:
    """Where a task's rows come from (the ``task`` config's data keys)."""

    data_dir: str | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    test_split: str | None = None
    data_files: str | dict | None = None
    columns: dict = field(default_factory=dict)

    def train_split(self, task: Task) -> str:
        return self.split if (self.dataset or self.data_files) else task.train_split

    def eval_split(self, task: Task) -> str:
        return self.test_split or task.test_split


@dataclass
class Rows:
    """Rows of one split and, for each, where it came from (for error messages)."""

    rows: list[dict]
    origins: list[tuple[str, int]]
    """``(file or dataset name, 1-based row number within it)`` of each row."""

    def where(self, i: int) -> str:
        name, row = self.origins[i]
        return f"{name} row {row}"


def as_source(data: "DataSource | str | None") -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data_dir=data)


# -- the built-in layout: <data_dir>/<task>/<split>.jsonl ----------------------------------------------
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


# -- local files ---------------------------------------------------------------------------------------
def split_files(data_files: str | dict | list) -> dict[str, list[str]]:
    """``task.data_files`` as ``{split: [path, ...]}`` (a plain path or glob, or a list, is ``train``)."""
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}
    out = {}
    for split, spec in data_files.items():
        specs = [spec] if isinstance(spec, str) else list(spec)
        paths: list[str] = []
        for s in specs:
            if not isinstance(s, str):
                raise ConfigError(f"task.data_files[{split!r}] = {s!r}; allowed: a path or glob")
            matched = sorted(glob.glob(str(Path(s).expanduser()), recursive=True))
            if not matched:
                raise ConfigError(f"task.data_files: {s} matches no file")
            for m in matched:
                if Path(m).suffix.lower() not in FILE_FORMATS:
                    raise ConfigError(f"task.data_files: {m} is not a supported file; allowed: "
                                      f"{', '.join(FILE_FORMATS)}")
            paths += matched
        out[str(split)] = paths
    return out


def check_data_files(data_files: str | dict | list, split: str) -> None:
    files = split_files(data_files)
    if split not in files:
        raise ConfigError(f"task.data_files has no {split!r} split (task.split); it has {', '.join(files)}")


def _locate_bad_json(path: Path) -> str | None:
    """The first line of a json/jsonl file that does not parse, as a message."""
    text = path.read_text(errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno} is not valid JSON ({e.msg})"
        return None
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{line_no} is not valid JSON ({e.msg})"
    return None


def _load_file(path: str):
    import datasets

    p = Path(path)
    fmt = FILE_FORMATS[p.suffix.lower()]
    if fmt in ("json", "csv") and not p.read_text(errors="replace").strip():
        raise ConfigError(f"{p} is empty: no rows to train on")
    try:
        return datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # the builders raise many types; say which file and, when we can, which line
        located = _locate_bad_json(p) if fmt == "json" else None
        cause = e.__cause__ or e
        if "corresponds to no data" in str(cause):  # a csv with a header only
            raise ConfigError(f"{p} is empty: no rows to train on") from None
        raise ConfigError(located or f"{p} cannot be read as {fmt}: {type(cause).__name__}: {cause}") from None


def _rows_of(dataset, name: str, columns: dict) -> Rows:
    if len(dataset) and columns:
        have = set(dataset.column_names)
        missing = [user for user in columns.values() if user not in have]
        if missing:
            raise ConfigError(f"task.columns: {name} has no column {missing[0]!r}; its columns are "
                              f"{', '.join(sorted(have))}")
        rename = {user: ours for ours, user in columns.items() if user != ours}
        dataset = dataset.select_columns(list(have - set(rename.values())) if rename else list(have))
        dataset = dataset.rename_columns(rename)
    rows = list(dataset)
    return Rows(rows, [(name, i + 1) for i in range(len(rows))])


def _concat(parts: list[Rows]) -> Rows:
    return Rows([r for p in parts for r in p.rows], [o for p in parts for o in p.origins])


def _is_saved_dataset(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _load_dataset_split(source: DataSource, split: str, required: bool):
    """A split of ``task.dataset``: ``load_from_disk`` for a saved dataset, else ``load_dataset``."""
    import datasets

    name = source.dataset
    if _is_saved_dataset(name):
        loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                if required:
                    raise ConfigError(f"task.split = {split!r}: the dataset saved in {name} has splits "
                                      f"{', '.join(loaded)}")
                return None
            return loaded[split]
        # A single saved Dataset is the train split.
        return loaded if split == source.split else None
    try:
        return datasets.load_dataset(name, source.subset, split=split)
    except ValueError as e:
        if not required and "split" in str(e).lower():
            return None
        raise ConfigError(f"task.dataset = {name!r} (subset {source.subset!r}, split {split!r}): {e}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"task.dataset = {name!r}: not found ({e})") from None


def load_split(task: Task, split: str, source: "DataSource | str | None", required: bool = True) -> Rows | None:
    """Rows of ``split``, or None when an optional split does not exist (a local validation file
    absent). Checks the task's columns; the rows are not yet examples."""
    import datasets

    source = as_source(source)
    if source.data_files:
        files = split_files(source.data_files)
        if split not in files:
            if required:
                raise ConfigError(f"task.data_files has no {split!r} split; it has {', '.join(files)}")
            return None
        rows = _concat([_rows_of(_load_file(p), p, source.columns) for p in files[split]])
    elif source.dataset:
        loaded = _load_dataset_split(source, split, required)
        if loaded is None:
            return None
        rows = _rows_of(loaded, f"{source.dataset}[{split}]", source.columns)
    elif source.data_dir:
        path = local_split_file(source.data_dir, task, split)
        if not path.is_file():
            if required:
                raise ConfigError(f"task.data_dir: missing data file {path}")
            return None
        rows = _rows_of(_load_file(str(path)), str(path), source.columns)
    else:
        if task.hub_path is None:
            raise ConfigError(f"task {task.name!r} has no hub dataset; set task.data_files, task.dataset or "
                              "task.data_dir")
        loaded = datasets.load_dataset(task.hub_path, task.hub_name, split=split)
        rows = _rows_of(loaded, f"{task.hub_path}/{task.hub_name or ''}[{split}]", source.columns)
    check_columns(task, rows)
    check_labels(task, rows)
    return rows


def check_columns(task: Task, rows: Rows) -> None:
    """Every row has the template's columns (the first row missing one names what it has)."""
    for i, row in enumerate(rows.rows):
        missing = [c for c in task.columns if c not in row or (row[c] is None)]
        if missing:
            hint = (" (map your column names onto them with task.columns, e.g. "
                    f"{{{missing[0]}: your_column}})") if i == 0 else ""
            raise ConfigError(f"{rows.where(i)}: missing column {missing[0]!r} needed by task {task.name!r} "
                              f"(needs {', '.join(task.columns)}; the row has {', '.join(sorted(row))}){hint}")


def check_labels(task: Task, rows: Rows) -> None:
    """Every row (not only the sampled ones) turns into examples whose labels index their options: a
    label of -1, which Python would read from the end of the option list, or one past the options,
    fails here naming the file and row, before the model loads."""
    for i, row in enumerate(rows.rows):
        if "label" in row and (isinstance(row["label"], bool) or not isinstance(row["label"], int) or row["label"] < 0):
            raise ConfigError(f"{rows.where(i)}: label {row['label']!r}; allowed for task {task.name!r}: "
                              "an integer >= 0 indexing its options")
        options = getattr(task, "verbalizer", None)
        if "label" in row and options and row["label"] >= len(options):  # before the template indexes with it
            raise ConfigError(f"{rows.where(i)}: label {row['label']!r}; allowed for task {task.name!r}: "
                              f"0..{len(options) - 1} for its {len(options)} options")
        try:
            examples = task.examples(row)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ConfigError(f"{rows.where(i)}: task {task.name!r} cannot read this row ({type(e).__name__}: {e})") \
                from None
        for ex in examples:
            labels = ex.label if isinstance(ex.label, list) else [] if ex.label is None else [ex.label]
            if ex.options and any(not isinstance(lab, int) or not 0 <= lab < len(ex.options) for lab in labels):
                raise ConfigError(f"{rows.where(i)}: label {ex.label!r}; allowed for task {task.name!r}: "
                                  f"0..{len(ex.options) - 1} for its {len(ex.options)} options")


def to_examples(task: Task, rows: Rows, indices: list[int]) -> list[Example]:
    """Examples of the selected rows; a row the template cannot read is reported by file and row."""
    out: list[Example] = []
    for i in indices:
        try:
            out.extend(task.examples(rows.rows[i]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            what = f"missing column {e}" if isinstance(e, KeyError) else str(e)
            raise ConfigError(f"{rows.where(i)}: task {task.name!r} cannot read this row: {what}") from None
    return out


def load_task_data(task: Task, data: "DataSource | str | None", num_train: int, num_dev: int, num_test: int,
                   seed: int) -> TaskData:
    """Seeded few-shot splits: ``num_train`` + ``num_dev`` from train, ``num_test`` from the test split.

    Without a test split, test is taken from the train split as well (after train and dev).
    A negative count means "all that remain". ``data`` is a :class:`DataSource` (or, as before,
    a ``data_dir`` path or None for the hub).
    """
    source = as_source(data)
    train_rows = load_split(task, source.train_split(task), source)
    if not train_rows.rows:
        raise ConfigError(f"task {task.name!r}: the train split ({_describe(source, task)}) is empty")
    rng = random.Random(seed)
    order = list(range(len(train_rows.rows)))
    rng.shuffle(order)

    def take(pool: list[int], count: int) -> tuple[list[int], list[int]]:
        count = len(pool) if count < 0 else min(count, len(pool))
        return pool[:count], pool[count:]

    train_idx, rest = take(order, num_train)
    dev_idx, rest = take(rest, num_dev)
    test_rows = load_split(task, source.eval_split(task), source, required=False) if num_test else None
    if test_rows is not None and test_rows.rows:
        test_order = list(range(len(test_rows.rows)))
        random.Random(seed + 1).shuffle(test_order)
        test = to_examples(task, test_rows, take(test_order, num_test)[0])
    else:
        test = to_examples(task, train_rows, take(rest, num_test)[0])
    return TaskData(train=to_examples(task, train_rows, train_idx), dev=to_examples(task, train_rows, dev_idx),
                    test=test)


def _describe(source: DataSource, task: Task) -> str:
    if source.data_files:
        return f"task.data_files = {source.data_files!r}"
    if source.dataset:
        return f"task.dataset = {source.dataset!r}"
    if source.data_dir:
        return f"task.data_dir = {source.data_dir!r}"
    return f"hub dataset {task.hub_path}"
