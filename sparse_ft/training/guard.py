"""The divergence guard: an optimizer step whose loss or gradient is not finite is skipped, counted
and logged; ``train.max_bad_steps`` such steps in a row stop the run.

Decision: after the last micro-batch's backward (the accumulation boundary), each rank counts the
non-finite entries of its own share of the trained parameters' reduced gradients, without a host
sync; the count travels in the all-reduce the loop already does for the loss, so every rank reads
the same verdict from the one scalar transfer the loop already had.

Skipping: the engine's step runs as usual (so DeepSpeed's gradient buffers, micro-step counters and
ZeRO partitions stay consistent) while :func:`make_skippable` makes the update itself a no-op.
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


class _Skippable:
    """Mixed into an optimizer's class: ``step`` does nothing while ``skipping`` is set."""

    skipping: bool = False

    def step(self, closure=None):
        if self.skipping:
            return None
        return super().step(closure)


def make_skippable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give ``optimizer`` (torch AdamW, a bitsandbytes 8-bit AdamW...) a ``skipping`` switch, in place.
    A subclass made on the fly keeps ``isinstance`` checks (DeepSpeed's among them) true."""
    cls = type(optimizer)
    optimizer.__class__ = type(f"Skippable{cls.__name__}", (_Skippable, cls), {})
    return optimizer


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


def local_grads(engine, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """This rank's share of the reduced gradients of ``params``, right after the boundary backward
    (no communication).

    ZeRO-3 keeps them in partitioned fp32 buffers (DeepSpeed's ``safe_get_local_grad`` per parameter).
    ZeRO-1/2 keep this rank's partition as a list per parameter group, the tensors DeepSpeed's own
    overflow check reads (``averaged_gradients``; with CPU offload, the fp32 partition's ``.grad``);
    a parameter's ``_hp_mapping`` index does not address that list when the partition holds only part
    of the group. Without ZeRO they are ``param.grad`` (bf16 keeps an fp32 copy in ``_hp_grad``).
    """
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    grads: list = []
    if stage == 3:
        from deepspeed.utils import safe_get_local_grad

        grads = [safe_get_local_grad(p) for p in params]
    elif stage in (1, 2):
        if getattr(opt, "cpu_offload", False):
            grads = [g.grad for g in opt.single_partition_of_fp32_groups]
        else:
            grads = [g for group in opt.averaged_gradients.values() for g in (group or [])]
    else:
        grads = [getattr(p, "_hp_grad", None) if getattr(p, "_hp_grad", None) is not None else p.grad
                 for p in params]
    return [g for g in grads if g is not None and g.numel()]


def count_nonfinite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Number of non-finite entries over ``tensors``, as a float64 scalar on ``device`` (no sync)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total += torch.logical_not(torch.isfinite(t)).sum().to(device=device, dtype=torch.float64)
    return total


def sum_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squared entries over ``tensors`` (fp64 scalar on ``device``, no sync): a gradient
    norm's square, for metrics."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total += t.detach().float().pow(2).sum().to(device=device, dtype=torch.float64)
    return total


def check_max_bad_steps(value: int) -> None:
    if value < 0:
        raise ConfigError(f"train.max_bad_steps = {value}; allowed: >= 0 (0: never stop, still skip bad steps)")
