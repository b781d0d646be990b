"""``train.report_to``: TensorBoard and (offline) W&B get the same values as metrics.jsonl; trackers
are checked before any model loads."""
import json

import pytest

from sparse_ft.config import load_config
from sparse_ft.errors import ConfigError
from sparse_ft.training.trainer import train
from helpers import base_run_tree, make_model_dir, make_sentiment_data, write_yaml


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """Records of a ``.wandb`` file (wandb's LevelDB-style log: a 7-byte file header, then records
    of a 7-byte header ``<crc32 uint32, length uint16, type uint8>`` and data, never crossing a
    32 KiB block; type 1 a whole record, 2/3/4 its first/middle/last piece), parsed with wandb's
    own protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):
            pieces += chunk
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pieces + chunk)
        pieces = b""
        yield record


def wandb_history(wandb_dir):
    """The history rows the offline W&B run recorded."""
    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = list(wandb_records(files[0]))
    assert records[-1].WhichOneof("record_type") == "exit"  # the run was finished and flushed
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"], records


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("track")
    return {"model": make_model_dir(tmp / "llama", "llama"), "data": make_sentiment_data(tmp / "data", 48, 16)}


def test_tensorboard_and_offline_wandb_hold_the_metrics_rows(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tree = base_run_tree(assets["model"], assets["data"], tmp_path / "out", epochs=1, eval_every=2,
                         report_to=["tensorboard", "wandb"], run_name="tiny-run")
    tree["task"].update(num_train=32, num_dev=16, num_test=16)
    train(load_config(write_yaml(tmp_path / "cfg.yaml", tree)))
    out = tmp_path / "out"
    rows = metrics_rows(out)
    assert any("loss" in r for r in rows) and any("dev/accuracy" in r for r in rows)
    assert any("grad_norm" in r for r in rows)

    scalars = tensorboard_scalars(out / "tensorboard")
    history, records = wandb_history(out / "wandb")
    checked = 0
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, (bool, str)):
                continue
            assert scalars[key][row["step"]] == pytest.approx(value, rel=1e-6), (key, row["step"])
            hits = [h for h in history if key in h and h["step"] == row["step"]]
            assert hits and hits[0][key] == pytest.approx(value, rel=1e-12), (key, row["step"])
            checked += 1
    assert checked >= 10
    # every eval metric, too (dev during and after training, test at the end)
    assert {"loss", "lr", "grad_norm", "dev/accuracy", "test/accuracy"} <= set(scalars)
    # run name and config recorded
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "tiny-run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"]["name"] == "random_mask" and config["train"]["report_to"] == ["tensorboard", "wandb"]


def test_csv_sink_has_every_value(assets, tmp_path):
    tree = base_run_tree(assets["model"], assets["data"], tmp_path / "out", max_steps=3, report_to="csv")
    train(load_config(write_yaml(tmp_path / "cfg.yaml", tree)))
    import csv

    with open(tmp_path / "out" / "metrics.csv") as f:
        lines = list(csv.DictReader(f))
    want = [(str(r["step"]), k, str(v)) for r in metrics_rows(tmp_path / "out") for k, v in r.items() if k != "step"]
    assert [(line["step"], line["name"], line["value"]) for line in lines] == want


@pytest.mark.parametrize("value,message", [(["tensorbored"], "not a tracker; allowed: tensorboard, wandb, csv"),
                                           ("wandb,wandb", "twice")])
def test_bad_report_to_is_one_line_before_load(assets, tmp_path, value, message):
    tree = base_run_tree(assets["model"], assets["data"], tmp_path / "out", report_to=value)
    with pytest.raises(ConfigError, match=message):
        load_config(write_yaml(tmp_path / "cfg.yaml", tree))


def test_missing_tracker_package_is_named(assets, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    tree = base_run_tree(assets["model"], assets["data"], tmp_path / "out", report_to=["wandb"])
    with pytest.raises(ConfigError, match="needs the wandb package: pip install wandb"):
        load_config(write_yaml(tmp_path / "cfg.yaml", tree))
