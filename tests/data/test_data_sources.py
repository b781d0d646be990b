"""Rows through ``datasets``: local json/jsonl/parquet/csv give the same examples, column mapping,
a dataset id passed through to ``load_dataset`` (saved datasets via ``load_from_disk``), and bad
data reported with its file and row before training. Nothing here touches the network."""
import json

import pytest

from sparse_ft.config import data_source, load_config
from sparse_ft.errors import ConfigError
from sparse_ft.tasks import get_task, load_task_data
from sparse_ft.tasks.data import DataSource
from helpers import base_run_tree, make_chat_tokenizer, make_model_dir, write_yaml

ROWS = [{"instruction": f"add {a} and {b}", "input": "" if i % 2 else "be brief", "output": f"sum {a + b}"}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4), (6, 1)])]


def write(path, rows, fmt):
    import datasets

    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    return path


def sample(source, task="alpaca", n=5, **task_options):
    data = load_task_data(get_task(task, **task_options), source, num_train=n, num_dev=2, num_test=1, seed=3)
    return data.train, data.dev, data.test


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_json_jsonl_parquet_csv_give_the_same_examples(tmp_path):
    results = {fmt: sample(DataSource(data_files=str(write(tmp_path / f"d.{fmt}", ROWS, fmt))))
               for fmt in ("jsonl", "json", "parquet", "csv")}
    reference = results.pop("jsonl")
    assert len(reference[0]) == 5 and reference[0][0].messages is not None
    for fmt, got in results.items():
        assert got == reference, fmt


def test_glob_and_split_mapping(tmp_path):
    write(tmp_path / "a.jsonl", ROWS[:4], "jsonl")
    write(tmp_path / "b.jsonl", ROWS[4:], "jsonl")
    write(tmp_path / "val.jsonl", ROWS[:1], "jsonl")
    one = sample(DataSource(data_files=str(write(tmp_path / "all.jsonl", ROWS, "jsonl"))), n=-1)
    globbed = sample(DataSource(data_files=str(tmp_path / "[ab].jsonl")), n=-1)
    assert globbed[0] == one[0]
    mapped = sample(DataSource(data_files={"train": str(tmp_path / "[ab].jsonl"),
                                           "validation": str(tmp_path / "val.jsonl")}))
    # The test example now comes from the validation file.
    assert mapped[2][0].target == "sum 3"


def test_column_mapping(tmp_path):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "id": i}
               for i, r in enumerate(ROWS)]
    path = write(tmp_path / "q.jsonl", renamed, "jsonl")
    reference = sample(DataSource(data_files=str(write(tmp_path / "d.jsonl", ROWS, "jsonl"))))
    got = sample(DataSource(data_files=str(path), columns={"instruction": "question", "input": "context",
                                                           "output": "answer"}))
    assert got == reference
    with pytest.raises(ConfigError, match=r"q.jsonl has no column 'prompt'; its columns are answer, context, id"):
        sample(DataSource(data_files=str(path), columns={"instruction": "prompt"}))


def test_saved_dataset_and_hub_id_pass_through(tmp_path, monkeypatch):
    import datasets

    reference = sample(DataSource(data_files=str(write(tmp_path / "d.jsonl", ROWS, "jsonl"))))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    assert sample(DataSource(dataset=str(saved))) == reference
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert sample(DataSource(dataset=str(single))) == reference

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = sample(DataSource(dataset="someone/alpaca-like", subset="en", split="train"))
    assert got == reference
    assert calls == [("someone/alpaca-like", "en", "train"), ("someone/alpaca-like", "en", "validation")]


def test_config_keys_reach_the_loader(tmp_path):
    tok_dir = make_model_dir(tmp_path / "model", "llama")
    make_chat_tokenizer(tok_dir)
    tree = base_run_tree(tok_dir, tmp_path, tmp_path / "out")
    tree["task"] = {"name": "alpaca", "data_files": {"train": str(write(tmp_path / "q.jsonl", ROWS, "jsonl"))},
                    "columns": {"output": "output"}, "system_prompt": "be brief", "chat_template": "chatml"}
    run = load_config(write_yaml(tmp_path / "c.yaml", tree))
    src = data_source(run.task)
    assert src.data_files == {"train": str(tmp_path / "q.jsonl")} and src.columns == {"output": "output"}


# -- bad data ------------------------------------------------------------------------------------------
def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"instruction": "x", \n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:3 is not valid JSON"):
        sample(DataSource(data_files=str(path)))


def test_missing_and_mistyped_columns_name_file_and_row(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[2]["output"]
    path = write(tmp_path / "missing.jsonl", rows, "jsonl")
    with pytest.raises(ConfigError, match=r"missing.jsonl row 3: missing column 'output' needed by task 'alpaca'"):
        sample(DataSource(data_files=str(path)))
    rows = [dict(r) for r in ROWS]
    rows[4]["output"] = ["sum", "4"]
    path = write(tmp_path / "typed.jsonl", rows, "jsonl")
    with pytest.raises(ConfigError, match=r"typed.jsonl row 5: task 'alpaca' cannot read this row: column 'output' "
                                          r"must be a string"):
        sample(DataSource(data_files=str(path)), n=-1)
    bad_chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
                {"messages": [{"role": "user", "content": "hi"}]}]
    path = write(tmp_path / "chat.jsonl", bad_chat, "jsonl")
    with pytest.raises(ConfigError, match=r"chat.jsonl row 2: task 'messages' cannot read this row: the conversation "
                                          "has no assistant message"):
        sample(DataSource(data_files=str(path)), task="messages", n=-1)


def test_empty_dataset_and_unknown_names(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.jsonl is empty: no rows"):
        sample(DataSource(data_files=str(empty)))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("instruction,input,output\n")
    with pytest.raises(ConfigError, match="empty.csv is empty: no rows"):
        sample(DataSource(data_files=str(header_only)))
    model = make_model_dir(tmp_path / "model", "llama")
    tree = base_run_tree(model, tmp_path, tmp_path / "out")
    data = str(write(tmp_path / "d.jsonl", ROWS, "jsonl"))
    cases = [({"name": "alpacca", "data_files": data}, "task.name = 'alpacca' is not a task"),
             ({"name": "alpaca", "data_files": data, "chat_template": "vicuna"}, "task.chat_template = 'vicuna'"),
             ({"name": "alpaca", "data_files": str(tmp_path / "nope*.jsonl")}, "matches no file"),
             ({"name": "alpaca", "data_files": str(tmp_path / "d.txt")}, "matches no file"),
             ({"name": "alpaca", "data_files": data, "truncation": "right"}, "task.truncation = 'right'; allowed"),
             ({"name": "alpaca", "data_files": {"validation": data}}, "no 'train' split"),
             ({"name": "alpaca", "data_files": data, "columns": {"answer": "x"}}, "'answer' is not a column"),
             ({"name": "alpaca"}, "task 'alpaca' needs data")]
    for task, message in cases:
        tree["task"] = task
        with pytest.raises(ConfigError, match=message):
            load_config(write_yaml(tmp_path / "c.yaml", tree))
    (tmp_path / "d.txt").write_text("x")
    tree["task"] = {"name": "alpaca", "data_files": str(tmp_path / "d.txt")}
    with pytest.raises(ConfigError, match="d.txt is not a supported file; allowed: .json, .jsonl, .parquet, .csv"):
        load_config(write_yaml(tmp_path / "c.yaml", tree))
