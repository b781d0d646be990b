"""Evaluation: option likelihood (classification), greedy generation + token F1 (squad, drop),
response loss (instruction data).

Examples are split across data-parallel ranks. Under ZeRO-3 every rank must run the same number
of forward passes (each one gathers parameters collectively), so ranks with less work run padding
batches whose results are dropped.
"""
from __future__ import annotations

import collections
import re
import string

import torch
import torch.nn.functional as F

from ..tasks.base import Example, Task
from ..tasks.encode import IGNORE, encode_pair, encode_train_example, pad
from .runtime import all_reduce_


# How an option is scored (train.eval_metric): today's mean log-likelihood per token, or
# lm-evaluation-harness's multiple-choice definitions: ``acc`` takes the summed log-likelihood of the
# continuation, ``acc_norm`` divides that sum by the continuation's length in UTF-8 bytes.
EVAL_METRICS = ("mean_logprob", "acc", "acc_norm")


def _option_score(token_logprobs: torch.Tensor, option: str, metric: str) -> float:
    total = token_logprobs.sum().item()
    if metric == "acc":
        return total
    if metric == "acc_norm":
        return total / max(len(option.encode("utf-8")), 1)
    return token_logprobs.mean().item()


def _synced(batches: list, dummy) -> list:
    """Pad ``batches`` with ``dummy`` so every rank iterates the same number of times."""
    n = torch.tensor([len(batches)], dtype=torch.long,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    all_reduce_(n, torch.distributed.ReduceOp.MAX if torch.distributed.is_initialized() else None)
    return batches + [dummy] * (int(n.item()) - len(batches))


def _shard(examples: list[Example], rank: int, world: int) -> list[Example]:
    return examples[rank::world]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def option_scores(model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                  device: torch.device, metric: str = "mean_logprob") -> list[list[float]]:
    """Score of every option of every example (one list per example): by default the mean
    log-likelihood per token; ``metric`` ``acc``/``acc_norm`` as lm-evaluation-harness (see
    ``EVAL_METRICS``).

    When every option of an example is a single token after the same prompt tokens (SST-2's
    " terrible"/" great"), one forward pass of the prompt scores them all.
    """
    # request: (example index, fed ids, [(option index, start position, target ids)])
    requests = []
    for ei, ex in enumerate(examples):
        encoded = [encode_pair(tokenizer, ex.prompt, option, max_length) for option in ex.options]
        prefixes = {tuple(ids[:-1]) for ids, n_cont in encoded}
        if all(n_cont == 1 for _, n_cont in encoded) and len(prefixes) == 1:
            prefix = list(prefixes.pop())
            requests.append((ei, prefix, [(oi, len(prefix), ids[-1:]) for oi, (ids, _) in enumerate(encoded)]))
        else:
            for oi, (ids, n_cont) in enumerate(encoded):
                requests.append((ei, ids, [(oi, len(ids) - n_cont, ids[len(ids) - n_cont:])]))
    # Longest first keeps padding low within a batch.
    requests.sort(key=lambda r: -len(r[1]))
    pad_id = tokenizer.pad_token_id or 0
    dummy = [(-1, [pad_id, pad_id], [])]
    scores = [[float("-inf")] * len(ex.options) for ex in examples]
    for batch in _synced(_chunks(requests, batch_size), dummy):
        enc = pad([r[1] for r in batch], None, pad_id)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        for row, (ei, _, items) in enumerate(batch):
            for oi, start, target in items:
                lp = F.log_softmax(logits[row, start - 1:start - 1 + len(target)].float(), dim=-1)
                idx = torch.tensor(target, device=lp.device)
                scores[ei][oi] = _option_score(lp.gather(1, idx[:, None]), examples[ei].options[oi], metric)
    return scores


def _normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style token F1 after lowercasing and removing punctuation and articles."""
    p, g = _normalize(prediction).split(), _normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                     max_new_tokens: int, device: torch.device, synced_gpus: bool) -> list[str]:
    prompts = []
    for ex in examples:
        ids, _ = encode_pair(tokenizer, ex.prompt, "", max_length - max_new_tokens)
        prompts.append(ids)
    batches = _chunks(list(enumerate(prompts)), batch_size)
    dummy = [(-1, [tokenizer.pad_token_id or 0])]
    out = [""] * len(examples)
    for batch in _synced(batches, dummy):
        enc = pad([p for _, p in batch], None, tokenizer.pad_token_id or 0, side="left")
        gen = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus,
                             pad_token_id=tokenizer.pad_token_id)
        width = enc["input_ids"].shape[1]
        for row, (i, _) in enumerate(batch):
            if i < 0:
                continue
            text = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
            out[i] = text.strip().split("\n")[0].strip()
    return out


@torch.no_grad()
def response_loss(model, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                  device: torch.device) -> tuple[float, int]:
    """(summed NLL, token count) over response tokens."""
    encoded = [encode_train_example(tokenizer, ex, max_length, add_eos=True) for ex in examples]
    dummy = [([tokenizer.pad_token_id or 0] * 2, [IGNORE] * 2)]
    total, count = 0.0, 0
    for batch in _synced(_chunks(encoded, batch_size), dummy):
        enc = pad([b[0] for b in batch], [b[1] for b in batch], tokenizer.pad_token_id or 0)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        labels = enc["labels"].to(device)[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")
        total += nll.item()
        count += int((labels != IGNORE).sum())
    return total, count


def evaluate(model, tokenizer, task: Task, examples: list[Example], *, batch_size: int, max_length: int,
             max_new_tokens: int, device: torch.device, rank: int, world: int, zero3: bool,
             eval_metric: str = "mean_logprob") -> dict:
    """Metrics over ``examples`` (split across ranks, reduced): ``accuracy``, ``f1`` or ``loss``,
    plus ``n``."""
    was_training = model.training
    model.eval()
    mine = _shard(examples, rank, world)
    try:
        if task.kind == "classification":
            scores = option_scores(model, tokenizer, mine, batch_size, max_length, device, eval_metric)
            correct = 0
            for ex, s in zip(mine, scores):
                pred = max(range(len(s)), key=s.__getitem__)
                gold = ex.label if isinstance(ex.label, list) else [ex.label]
                correct += int(pred in gold)
            stats = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
            all_reduce_(stats)
            return {"accuracy": float(stats[0] / max(stats[1], 1)), "n": int(stats[1])}
        if task.kind == "generation":
            answers = generate_answers(model, tokenizer, mine, batch_size, max_length, max_new_tokens, device,
                                       synced_gpus=zero3 and world > 1)
            f1 = sum(max(token_f1(a, g) for g in ex.answers) for a, ex in zip(answers, mine))
            stats = torch.tensor([f1, len(mine)], dtype=torch.float64, device=device)
            all_reduce_(stats)
            return {"f1": float(stats[0] / max(stats[1], 1)), "n": int(stats[1])}
        total, count = response_loss(model, tokenizer, mine, batch_size, max_length, device)
        stats = torch.tensor([total, count, len(mine)], dtype=torch.float64, device=device)
        all_reduce_(stats)
        return {"loss": float(stats[0] / max(stats[1], 1)), "n": int(stats[2])}
    finally:
        model.train(was_training)
