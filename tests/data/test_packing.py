"""Packing: the packed loss equals the unpacked loss on the same examples, no attention crosses an
example boundary, and a packed instruction run trains (tiny LLaMA and OPT, fp32, CPU)."""
import json
import random

import pytest
import torch

from sparse_ft.config import load_config
from sparse_ft.tasks.encode import IGNORE, pack, pad, pad_packed
from sparse_ft.training.trainer import train
from helpers import base_run_tree, make_chat_tokenizer, make_model_dir, tiny_model, write_yaml


def examples(seed=0, lengths=(5, 7, 3, 9, 4, 6)):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(4, 60) for _ in range(n)]
        k = rng.randrange(1, n)
        out.append((ids, [IGNORE] * k + ids[k:]))
    return out


def test_pack_groups_consecutive_examples_within_max_length():
    assert pack([5, 7, 3, 9, 4, 6], 12) == [[0, 1], [2, 3], [4, 5]]
    assert pack([12, 1, 11], 12) == [[0], [1, 2]]


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked(arch, attn):
    model = tiny_model(arch, attn_implementation=attn)
    exs = examples()
    unpacked = pad([e[0] for e in exs], [e[1] for e in exs], 0)
    packed = pad_packed([exs[:3], exs[3:5], exs[5:]], 0)
    with torch.no_grad():
        ref = model(**unpacked).loss
        got = model(**packed).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # The same numbers token by token: each packed example's logits equal its unpacked ones.
    with torch.no_grad():
        lu, lp = model(**unpacked).logits, model(**packed).logits
    at = 0
    for i in range(3):
        n = len(exs[i][0])
        torch.testing.assert_close(lp[0, at:at + n], lu[i, :n], rtol=1e-4, atol=1e-5)
        at += n


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_no_attention_across_example_boundaries(arch):
    model = tiny_model(arch)
    exs = examples()
    changed = [([(t + 7) % 56 + 4 for t in exs[0][0]], exs[0][1])] + exs[1:]
    with torch.no_grad():
        a = model(**pad_packed([exs[:3]], 0)).logits
        b = model(**pad_packed([changed[:3]], 0)).logits
    n0 = len(exs[0][0])
    assert not torch.allclose(a[0, :n0], b[0, :n0])  # the change is visible where it happened...
    torch.testing.assert_close(a[0, n0:], b[0, n0:], rtol=0, atol=0)  # ...and nowhere after the boundary


NUMBERS = ["one", "two", "three", "four", "five", "six", "seven"]


def alpaca_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 3), rng.randint(1, 4)
        rows.append({"instruction": f"add {NUMBERS[a - 1]} and {NUMBERS[b - 1]}", "input": "",
                     "output": f"sum {NUMBERS[a + b - 1]}"})
    return rows


@pytest.fixture(scope="module")
def chat_assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    model = make_model_dir(tmp / "llama", "llama")
    make_chat_tokenizer(model)
    for split, n, seed in (("train", 48, 0), ("validation", 24, 1)):
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(n, seed)))
    return {"model": model, "data": tmp}


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_instruction_run_lowers_assistant_loss(chat_assets, tmp_path, packing):
    tree = base_run_tree(chat_assets["model"], chat_assets["data"], tmp_path / "out", epochs=4, eval_before=True,
                         lr=3e-3, micro_batch_size=4, log_every=4)
    tree["method"] = {"name": "full"}
    tree["task"] = {"name": "alpaca", "data_files": {"train": str(chat_assets["data"] / "train.jsonl"),
                                                     "validation": str(chat_assets["data"] / "validation.jsonl")},
                    "num_train": -1, "num_dev": 0, "num_test": 24, "max_length": 40, "packing": packing}
    results = train(load_config(write_yaml(tmp_path / "c.yaml", tree)))
    assert results["test"]["loss"] < 0.5 * results["test_before"]["loss"], results
    assert results["data"]["train_examples"] == 48
    if packing:
        # 10-token examples (<|user|> add x and y <|end|> <|assistant|> sum z <|end|>): four per sequence.
        assert results["data"]["packs"] == 12
