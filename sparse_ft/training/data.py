"""Deterministic data order: a pure function of (seed, optimizer step), so a resumed run sees the
same batches as an uninterrupted one without saving any sampler state."""
from __future__ import annotations

import torch

from ..errors import ConfigError


class EpochSteps:
    """Step arithmetic shared by the data plans: subclasses set ``steps_per_epoch``."""

    steps_per_epoch: int

    def total_steps(self, epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, round(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


class BatchPlan(EpochSteps):
    """Which training examples each rank's micro-batches hold at every optimizer step.

    Each epoch is a fresh seeded permutation; a global batch (micro x accum x world examples) is a
    consecutive slice of it, split micro-batch by micro-batch across ranks. The incomplete last
    batch of an epoch is dropped, so every rank runs the same number of steps.
    """

    def __init__(self, n_examples: int, micro: int, accum: int, world: int, seed: int):
        self.n, self.micro, self.accum, self.world, self.seed = n_examples, micro, accum, world, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.micro_batch_size x train.grad_accum x processes = {micro} x {accum} x {world} = "
                f"{self.global_batch} exceeds the {n_examples} training examples; lower them or raise task.num_train")
        self._perm_epoch = -1
        self._perm = None

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=gen).tolist()
            self._perm_epoch = epoch
        batch = self._perm[i * self.global_batch:(i + 1) * self.global_batch]
        out = []
        for j in range(self.accum):
            start = (j * self.world + rank) * self.micro
            out.append(batch[start:start + self.micro])
        return out
