"""Tiny models, tokenizers and data built in-line, so tests need neither the hub nor a GPU."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fun", "lovely", "brilliant", "moving", "charming", "superb"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "tedious", "clumsy", "bland"]
FILLER = ["the", "movie", "film", "plot", "was", "really", "quite", "a", "story", "and", "acting", "very",
          "it", "this", "of", "is", "so"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
EXTRA = ["It", "terrible", "Yes", "No", "Maybe", "?", ".", "\n", "Does", "mean", "that", "true", "or"]
VOCAB = SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER + EXTRA))
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, OPTConfig

    vocab_size = 64
    assert len(VOCAB) <= vocab_size
    if arch == "llama":
        # Grouped-query attention: v_proj is 32 x 64, q_proj 64 x 64.
        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
        cfg.update(overrides)
        return LlamaConfig(**cfg)
    if arch == "opt":
        cfg = dict(vocab_size=vocab_size, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=2, eos_token_id=3,
                   pad_token_id=0, dropout=0.0, attention_dropout=0.0)
        cfg.update(overrides)
        return OPTConfig(**cfg)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.float().eval()


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, seed, **overrides).save_pretrained(str(path))
    make_tokenizer(path)
    return path


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """SST-2-schema rows whose label is set by which word list the adjectives come from."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words) + " .", "label": label, "idx": i})
    return rows


def make_sentiment_data(path: Path, n_train: int = 200, n_val: int = 64, seed: int = 0) -> Path:
    """``<path>/sst2/{train,validation}.jsonl`` with a learnable synthetic sentiment task."""
    d = Path(path) / "sst2"
    d.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("validation", n_val, seed + 1)):
        with open(d / f"{split}.jsonl", "w") as f:
            for row in sentiment_rows(n, s):
                f.write(json.dumps(row) + "\n")
    return Path(path)


def make_entailment_data(path: Path, n_train: int = 200, n_val: int = 64, seed: int = 0) -> Path:
    """``<path>/rte/{train,validation}.jsonl``: RTE-schema rows (0 entailment, 1 not) whose label says
    whether the hypothesis "it was <adjective>" has the premise's sentiment. A second task for
    multi-task runs, in the tiny tokenizer's vocabulary."""
    d = Path(path) / "rte"
    d.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed + 10), ("validation", n_val, seed + 11)):
        rng = random.Random(s)
        with open(d / f"{split}.jsonl", "w") as f:
            for row in sentiment_rows(n, s):
                label = rng.randint(0, 1)
                same = POSITIVE if row["label"] else NEGATIVE
                other = NEGATIVE if row["label"] else POSITIVE
                hypothesis = "it was " + rng.choice(same if label == 0 else other)
                f.write(json.dumps({"premise": row["sentence"], "hypothesis": hypothesis, "label": label,
                                    "idx": row["idx"]}) + "\n")
    return Path(path)


def write_yaml(path: Path, tree: dict) -> Path:
    import yaml

    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))
    return Path(path)


def base_run_tree(model_dir: Path, data_dir: Path, out_dir: Path, **train) -> dict:
    tree = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "random_mask", "density": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "task": {"name": "sst2", "data_dir": str(data_dir), "num_train": 128, "num_dev": 0, "num_test": 64,
                 "max_length": 32},
        "train": {"output_dir": str(out_dir), "epochs": 2, "micro_batch_size": 8, "lr": 5e-2,
                  "precision": "fp32", "log_every": 1},
        "deepspeed": {"config": "zero0"},
    }
    tree["train"].update(train)
    return tree


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(script: Path, args: list[str], nproc: int = 2, timeout: int = 600):
    """``deepspeed --num_gpus N script args`` (CPU ranks with gloo when there is no GPU), on a free
    port, from the repository root. Fails the test with the output's tail on a non-zero exit."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
           "--num_gpus", str(nproc), str(script), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{(out.stdout + out.stderr)[-6000:]}")
    return out


class InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradient backward: a bad step on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


CHAT_WORDS = ["system", "user", "assistant", "hi", "hello", "there", "you", "how", "are", "fine", "thanks", "what", "is", "two", "plus", "four",
              "be", "brief", "add", "numbers", "one", "three", "five", "six", "seven", "and", "sum"]
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def make_chat_tokenizer(path: Path | None = None, chat_template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer with role markers as special tokens and a Jinja chat template:
    ``<|user|> hi there <|end|> <|assistant|> hello <|end|>`` is one token per word/marker."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + CHAT_SPECIALS + CHAT_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=CHAT_SPECIALS)
    if chat_template is not None:
        fast.chat_template = chat_template
    if path is not None:
        fast.save_pretrained(str(path))
    return fast
