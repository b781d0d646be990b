"""Tokenisation of examples: prompt + continuation with the loss on continuation tokens only;
length limits that never cut an answer silently; packing several examples into one sequence."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Example

logger = logging.getLogger("sparse_ft")
TRUNCATIONS = ("left", "drop")

IGNORE = -100


def encode_pair(tokenizer, prompt: str, continuation: str, max_length: int, add_eos: bool = False
                ) -> tuple[list[int], int]:
    """Token ids of ``prompt + continuation`` and how many trailing ids belong to the continuation.

    The pair is tokenised jointly when the prompt's tokens are a prefix of the joint tokens (so the
    continuation is tokenised as it appears in running text); otherwise the continuation is
    tokenised on its own and appended. Too-long prompts lose tokens from the left (after BOS), so the
    question and answer at the end survive.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    joint = tokenizer(prompt + continuation, add_special_tokens=True)["input_ids"]
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        cont_ids = joint[len(prompt_ids):]
    else:
        cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        cont_ids = cont_ids + [tokenizer.eos_token_id]
    cont_ids = cont_ids[:max_length - 1] if len(cont_ids) >= max_length else cont_ids
    room = max_length - len(cont_ids)
    if len(prompt_ids) > room:
        keep_bos = prompt_ids and prompt_ids[0] == tokenizer.bos_token_id
        head = prompt_ids[:1] if keep_bos else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (room - len(head)):]
    return prompt_ids + cont_ids, len(cont_ids)


def encode_full(tokenizer, ex: Example, add_eos: bool) -> tuple[list[int], list[int]]:
    """Ids and labels of an example at its full length (labels: the ids on trained tokens)."""
    if ex.messages is not None:
        from .chat import encode_chat

        return encode_chat(tokenizer, ex.messages)
    ids, n_cont = encode_pair(tokenizer, ex.prompt, ex.target, 1 << 30, add_eos=add_eos)
    return ids, [IGNORE] * (len(ids) - n_cont) + ids[len(ids) - n_cont:]


def fit_length(ids: list[int], labels: list[int], max_length: int, bos_id: int | None
               ) -> tuple[list[int], list[int]] | None:
    """``ids``/``labels`` cut to ``max_length`` from the left (keeping a leading BOS), so the last
    answer stays whole; None when even the last answer alone does not fit."""
    if len(ids) <= max_length:
        return ids, labels
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
    # The last answer starts after the last untrained token before the final trained run.
    last_start = 0
    if trained:
        last_start = trained[-1]
        while last_start > 0 and labels[last_start - 1] != IGNORE:
            last_start -= 1
    head = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
    room = max_length - head
    if len(ids) - last_start > room - 1:  # at least one prompt token must precede the answer
        return None
    keep = slice(len(ids) - room, len(ids))
    return ids[:head] + ids[keep], labels[:head] + labels[keep]


def encode_train_example(tokenizer, ex: Example, max_length: int, add_eos: bool) -> tuple[list[int], list[int]]:
    """Ids and labels within ``max_length``: the prompt cut from the left, and the answer cut from
    the right only if it cannot fit on its own (evaluation uses this; training counts those cases
    through :func:`encode_training_set`)."""
    ids, labels = encode_full(tokenizer, ex, add_eos)
    fitted = fit_length(ids, labels, max_length, tokenizer.bos_token_id)
    if fitted is None:
        return ids[:max_length], labels[:max_length]
    return fitted


@dataclass
class LengthReport:
    """What the length limit did to a training set (logged, and kept for results)."""

    total: int = 0
    prompt_cut: int = 0
    """Examples whose prompt (or earlier turns) lost tokens from the left; the answer is whole."""
    dropped: int = 0
    """Examples left out: longer than ``max_length`` with ``truncation=drop``, or an answer that
    alone does not fit."""


def encode_training_set(tokenizer, examples: list[Example], max_length: int, add_eos: bool, truncation: str = "left",
                        where: str = "task") -> tuple[list[tuple[list[int], list[int]]], LengthReport]:
    """Encode training examples under ``task.truncation``: ``left`` cuts over-long prompts from the
    left and keeps the answer (examples whose answer alone is too long are dropped); ``drop``
    leaves every over-long example out. Both are counted and logged, never silent."""
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"task.truncation = {truncation!r}; allowed: {', '.join(TRUNCATIONS)}")
    out, report = [], LengthReport(total=len(examples))
    for ex in examples:
        ids, labels = encode_full(tokenizer, ex, add_eos)
        if len(ids) > max_length:
            fitted = fit_length(ids, labels, max_length, tokenizer.bos_token_id) if truncation == "left" else None
            if fitted is None:
                report.dropped += 1
                continue
            report.prompt_cut += 1
            ids, labels = fitted
        out.append((ids, labels))
    if report.prompt_cut or report.dropped:
        logger.warning("%s: %d of %d training examples exceed task.max_length=%d: %d had their prompt cut from the "
                       "left (answer kept), %d were dropped (task.truncation=%s)", where,
                       report.prompt_cut + report.dropped, report.total, max_length, report.prompt_cut,
                       report.dropped, truncation)
    if not out:
        raise ConfigError(f"{where}: all {report.total} training examples exceed task.max_length={max_length} and were "
                          "dropped; raise task.max_length")
    return out, report


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Consecutive examples grouped greedily into packs of at most ``max_length`` tokens."""
    packs: list[list[int]] = []
    size = max_length + 1
    for i, n in enumerate(lengths):
        if size + n > max_length:
            packs.append([])
            size = 0
        packs[-1].append(i)
        size += n
    return packs


def pad_packed(packs: list[list[tuple[list[int], list[int]]]], pad_id: int, dtype: torch.dtype = torch.float32
               ) -> dict[str, torch.Tensor]:
    """A batch of packs (each a list of (ids, labels) examples): ids and labels concatenated,
    position ids restarting at 0 for each example, and a 4D additive attention mask that is causal
    within each example and blocks attention across examples (padding forms its own block).
    The first token of each example is not a target, so no loss crosses a boundary."""
    width = max(sum(len(ids) for ids, _ in p) for p in packs)
    n = len(packs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    lab = torch.full((n, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    for b, p in enumerate(packs):
        at = 0
        for k, (x, y) in enumerate(p):
            ids[b, at:at + len(x)] = torch.tensor(x)
            lab[b, at + 1:at + len(x)] = torch.tensor(y[1:], dtype=torch.long)
            pos[b, at:at + len(x)] = torch.arange(len(x))
            segment[b, at:at + len(x)] = k
            at += len(x)
        pos[b, at:] = torch.arange(width - at)
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros((n, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "labels": lab, "position_ids": pos, "attention_mask": mask}


def pad(seqs: list[list[int]], labels: list[list[int]] | None, pad_id: int, side: str = "right"
        ) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence; ``labels`` are padded with IGNORE."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
        if lab is not None:
            lab[i, sl] = torch.tensor(labels[i])
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out
