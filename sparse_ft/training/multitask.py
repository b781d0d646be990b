"""Several tasks in one run (multi-task ProPETL): data, the batch mix and per-task evaluation.

The Trainer consults :func:`TaskMix.from_run`; when the method names ``tasks`` it trains on their
mix and evaluates each one, otherwise nothing here is used. Every micro-batch holds examples of
one task, and all ranks process the same task in the same micro-batch slot, so the task mask in
use (and hence the set of parameters that receive gradients) is the same on every rank.
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from ..methods.propetl import set_task
from ..tasks import TaskData, get_task, load_task_data
from ..tasks.data import check_local_files
from ..tasks.encode import encode_train_example
from .data import EpochSteps
from .evaluate import evaluate

logger = logging.getLogger("sparse_ft")


class TaskMixPlan(EpochSteps):
    """Which examples each rank's micro-batches hold at every optimizer step; same interface as
    :class:`sparse_ft.training.data.BatchPlan` and, like it, a pure function of (seed, step).

    Each epoch, every task's examples are permuted (seeded by epoch and task) and cut into groups
    of ``micro x world`` examples (an incomplete last group is dropped); the groups of all tasks
    are shuffled together, so batches are drawn from the tasks in proportion to their sizes. A
    group is one micro-batch slot: rank r takes its r-th ``micro`` examples.
    """

    def __init__(self, task_examples: list[list[int]], micro: int, accum: int, world: int, seed: int):
        self.tasks, self.micro, self.accum, self.world, self.seed = task_examples, micro, accum, world, seed
        self.group = micro * world
        self.groups_per_epoch = sum(len(ex) // self.group for ex in task_examples)
        self.steps_per_epoch = self.groups_per_epoch // accum
        if self.steps_per_epoch == 0:
            sizes = ", ".join(str(len(ex)) for ex in task_examples)
            raise ConfigError(f"train.micro_batch_size x processes = {micro} x {world} and train.grad_accum = {accum} "
                              f"leave no complete multi-task step in tasks of {sizes} training examples; lower them "
                              "or raise task.num_train")
        self._epoch, self._order = -1, None

    def _groups(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            groups = []
            for t, examples in enumerate(self.tasks):
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + t)
                perm = [examples[i] for i in torch.randperm(len(examples), generator=gen).tolist()]
                groups += [perm[i:i + self.group] for i in range(0, len(perm) - self.group + 1, self.group)]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
            self._epoch = epoch
        return self._order

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        groups = self._groups(epoch)[i * self.accum:(i + 1) * self.accum]
        return [g[rank * self.micro:(rank + 1) * self.micro] for g in groups]


class TaskMix:
    """The tasks of a multi-task run: their data, encoded examples and the task of each example."""

    def __init__(self, names: list[str], run, tokenizer):
        tc = run.task
        self.names = list(names)
        self.tasks = [get_task(n, prompt_field=tc.prompt_field, response_field=tc.response_field) for n in names]
        for task in self.tasks:
            if tc.data_dir is not None:
                check_local_files(tc.data_dir, task)
            elif task.hub_path is None:
                raise ConfigError(f"method.tasks: task {task.name!r} needs task.data_dir (it has no hub dataset)")
        self.data = [load_task_data(t, tc.data_dir, tc.num_train, tc.num_dev, tc.num_test, tc.seed) for t in self.tasks]
        self.encoded: list = []
        self.task_of: list[int] = []
        self.train_indices: list[list[int]] = []
        for t, (task, data) in enumerate(zip(self.tasks, self.data)):
            start = len(self.encoded)
            add_eos = task.kind != "classification"
            self.encoded += [encode_train_example(tokenizer, ex, tc.max_length, add_eos) for ex in data.train]
            self.task_of += [t] * len(data.train)
            self.train_indices.append(list(range(start, len(self.encoded))))
        # The Trainer checks splits for emptiness and counts training examples through this.
        self.combined = TaskData(train=sum((d.train for d in self.data), []), dev=sum((d.dev for d in self.data), []),
                                 test=sum((d.test for d in self.data), []))
        self.method = run.method
        logger.info("multi-task run: %s", ", ".join(f"{n} ({len(d.train)} train)" for n, d in zip(names, self.data)))

    @classmethod
    def from_run(cls, run, tokenizer) -> "TaskMix | None":
        names = list(getattr(run.method, "tasks", None) or [])
        return cls(names, run, tokenizer) if names else None

    def plan(self, micro: int, accum: int, world: int, seed: int) -> TaskMixPlan:
        return TaskMixPlan(self.train_indices, micro, accum, world, seed)

    def activate(self, model, example_indices: list[int]) -> None:
        """Select the task of this micro-batch (all its examples share one) on the model."""
        set_task(model, self.task_of[example_indices[0]])

    def evaluate(self, trainer, split: str) -> dict:
        """Each task on its own split with its own task mask: ``<task>/<metric>`` keys plus the mean
        of the tasks' main metrics under the metric's own name."""
        tc, task_cfg = trainer.run_config.train, trainer.run_config.task
        module = trainer.engine if trainer.engine is not None else trainer.model
        out: dict = {}
        main = []
        for t, (task, data) in enumerate(zip(self.tasks, self.data)):
            examples = getattr(data, split)
            if not examples:
                continue
            set_task(trainer.model, t)
            res = evaluate(module, trainer.tokenizer, task, examples,
                           batch_size=tc.eval_batch_size or tc.micro_batch_size, max_length=task_cfg.max_length,
                           max_new_tokens=task_cfg.max_new_tokens, device=trainer.device, rank=trainer.rank,
                           world=trainer.world, zero3=trainer.zero3, eval_metric=tc.eval_metric)
            out.update({f"{task.name}/{k}": v for k, v in res.items()})
            main.append((task.metric, res[task.metric]))
        if main and len({m for m, _ in main}) == 1:
            out[main[0][0]] = sum(v for _, v in main) / len(main)
        if trainer.zero3 and trainer.engine is not None:
            trainer.engine.empty_partition_cache()
        return out
