"""The divergence guard: an optimizer step whose loss or gradient is not finite is skipped, counted
and logged; ``train.max_bad_steps`` such steps in a row stop the run.

Decision: after the last micro-batch's backward (the accumulation boundary), each rank counts the
non-finite entries of its own share of the trained parameters' reduced gradients, without a host
sync; the count travels in the all-reduce the loop already does for the loss, so every rank reads
the same verdict from the one scalar transfer the loop already had.

Skipping: the engine's step runs as usual (so DeepSpeed's gradient buffers, micro-step counters and
ZeRO partitions stay consistent) while :class:`SkippableAdamW` makes the update itself a no-op.
Every ZeRO stage ends in the client optimizer's ``step`` on the fp32 values, so nothing trained and
no optimizer state (moments, AdamW's own step count) changes. The LR schedule advances on a skipped
step, as the data order does: both stay functions of the step number (DeepSpeed's own overflow skip
would hold the schedule back, so the guard steps it in that case).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

# ``sparse-ft train`` exits with this code when the guard stopped the run (2 is bad input).
EXIT_DIVERGED = 3
DIVERGED_FILE = "diverged.json"


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose ``step`` does nothing while ``skipping`` is set."""

    skipping: bool = False

    def step(self, closure=None):
        if self.skipping:
            return None
        return super().step(closure)


class Diverged(Exception):
    """Raised inside ``fit`` when ``train.max_bad_steps`` consecutive steps were skipped."""

    def __init__(self, step: int, lr: float, consecutive: int, total: int, stage: str, reason: str,
                 last_checkpoint: str | None):
        self.step, self.lr, self.consecutive, self.total = step, lr, consecutive, total
        self.stage, self.reason, self.last_checkpoint = stage, reason, last_checkpoint
        kept = (f"the last good checkpoint, {last_checkpoint}, is kept" if last_checkpoint
                else "no checkpoint had been written")
        super().__init__(
            f"training diverged: {consecutive} consecutive optimizer steps up to step {step} had a {reason} and "
            f"were skipped (train.max_bad_steps = {consecutive}); the learning rate was {lr:g}. Try a lower "
            f"learning rate (e.g. train.lr={lr / 10:g}); {kept}")

    def record(self) -> dict:
        """What ``diverged.json`` holds."""
        return {"step": self.step, "lr": self.lr, "consecutive_bad_steps": self.consecutive,
                "bad_steps": self.total, "stage": self.stage, "reason": self.reason,
                "last_checkpoint": self.last_checkpoint}


def local_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """This rank's share of the reduced gradients of ``params``, right after the boundary backward.

    ZeRO-3 keeps them in partitioned fp32 buffers (DeepSpeed's ``safe_get_local_grad``); ZeRO-1/2 in
    the flat partition each parameter's ``_hp_mapping`` points into (only the parameters with a
    fragment on this rank have one); without ZeRO they are ``param.grad``. No communication.
    """
    from deepspeed.utils import safe_get_local_grad

    grads = []
    for p in params:
        if hasattr(p, "ds_id"):
            g = safe_get_local_grad(p)
        elif getattr(p, "_hp_mapping", None) is not None:
            g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
        else:
            g = p.grad
        if g is not None and g.numel():
            grads.append(g)
    return grads


def count_nonfinite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Number of non-finite entries over ``tensors``, as a float64 scalar on ``device`` (no sync)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total += torch.logical_not(torch.isfinite(t)).sum().to(device=device, dtype=torch.float64)
    return total


def check_max_bad_steps(value: int) -> None:
    if value < 0:
        raise ConfigError(f"train.max_bad_steps = {value}; allowed: >= 0 (0: never stop, still skip bad steps)")
