"""Learning-rate schedules: every step's rate equals ``transformers.get_scheduler``'s, through a
stop and a resume from the checkpoint; warm-up keys are validated."""
import json

import pytest
import torch

from sparse_ft.config import load_config
from sparse_ft.errors import ConfigError
from sparse_ft.training.trainer import train
from helpers import base_run_tree, make_model_dir, make_sentiment_data, write_yaml

STEPS, STOP, LR = 10, 4, 5e-2
CASES = [  # (train.schedule, warm-up keys, scheduler_kwargs, the get_scheduler name and warm-up it must equal)
    ("constant", {}, {}, "constant", 0),
    ("constant", {"warmup_steps": 3}, {}, "constant_with_warmup", 3),
    ("constant_with_warmup", {"warmup_steps": 3}, {}, "constant_with_warmup", 3),
    ("linear", {"warmup_steps": 2}, {}, "linear", 2),
    ("cosine", {"warmup_ratio": 0.25}, {}, "cosine", 3),  # ceil(0.25 * 10)
    ("cosine_with_restarts", {"warmup_steps": 1}, {"num_cycles": 2}, "cosine_with_restarts", 1),
    ("polynomial", {"warmup_steps": 2}, {"power": 2.0, "lr_end": 1e-4}, "polynomial", 2),
    ("warmup_stable_decay", {"warmup_steps": 2}, {"num_decay_steps": 4}, "warmup_stable_decay", 2),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sched")
    return {"model": make_model_dir(tmp / "llama", "llama"), "data": make_sentiment_data(tmp / "data", 48, 8)}


def reference(name, warmup, kwargs):
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=STEPS,
                          scheduler_specific_kwargs=kwargs or None)
    out = []
    for _ in range(STEPS):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("schedule, warm, kwargs, ref_name, ref_warmup", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_schedule_equals_get_scheduler_across_resume(assets, tmp_path, schedule, warm, kwargs, ref_name, ref_warmup):
    tree = base_run_tree(assets["model"], assets["data"], tmp_path / "out", max_steps=STEPS, lr=LR,
                         micro_batch_size=4, schedule=schedule, scheduler_kwargs=kwargs, save_every=STOP,
                         save_delta=False, **warm)
    tree["task"].update(num_train=32, num_test=0)
    cfg = write_yaml(tmp_path / "c.yaml", tree)
    assert train(load_config(cfg, [f"train.stop_after_steps={STOP}"])) == {"stopped_at_step": STOP}
    train(load_config(cfg, ["train.resume_from=latest"]))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in rows if "lr" in r]
    assert [r["step"] for r in rows if "lr" in r] == list(range(1, STEPS + 1))
    assert logged == pytest.approx(reference(ref_name, ref_warmup, kwargs), rel=1e-12, abs=0)


def test_warmup_keys_are_validated(assets, tmp_path):
    def load(**train_kw):
        tree = base_run_tree(assets["model"], assets["data"], tmp_path / "out", **train_kw)
        return load_config(write_yaml(tmp_path / "c.yaml", tree))

    with pytest.raises(ConfigError, match="train.warmup_steps = 3 and train.warmup_ratio = 0.1: set one"):
        load(warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="train.warmup_steps = -1; allowed: >= 0"):
        load(warmup_steps=-1)
    with pytest.raises(ConfigError, match="train.schedule = 'cosin'; allowed: constant, constant_with_warmup"):
        load(schedule="cosin")
    from sparse_ft.training.trainer import check_schedule

    with pytest.raises(ConfigError, match="train.scheduler_kwargs = {'cycles': 2}"):
        check_schedule(load(schedule="cosine", scheduler_kwargs={"cycles": 2}).train)
