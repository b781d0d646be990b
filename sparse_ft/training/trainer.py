"""The training loop: a DeepSpeed engine over an adapted causal LM, few-shot task data, periodic
evaluation and checkpoints, ``metrics.jsonl``, and the compact delta at the end.

A method's pipeline is a list of stages (:meth:`MethodConfig.stages`); each gets its own engine,
optimizer and schedule, and evaluation at its end. Checkpoints record (stage, step), so a resumed
run continues exactly where the checkpoint left it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch
import yaml

from .. import api
from ..config import RunConfig, TrainConfig, data_source, task_of
from ..delta import save_delta
from ..errors import ConfigError, RunError
from ..methods.base import find_targets
from ..quant import make_optimizer
from ..tasks import load_task_data
from ..tasks.chat import set_chat_template
from ..tasks.encode import encode_training_set, pack, pad, pad_packed
from . import runtime
from .checkpoint import (CheckpointManager, CorruptCheckpoint, list_checkpoints, newest_intact, read_latest,
                         read_state, verify)
from .data import BatchPlan
from .ds_config import build_ds_config, zero_stage
from .evaluate import evaluate
from .guard import DIVERGED_FILE, Diverged, count_nonfinite, local_grads, make_skippable, sum_squares
from .jobstatus import WATCH, startup_barrier
from .model import load_config_only, load_model, load_tokenizer, meta_model
from .multitask import TaskMix
from .rundir import RunLock, check_finished, check_resume_config, read_run_config

logger = logging.getLogger("sparse_ft")


def check_targets(run: RunConfig) -> None:
    """Match ``method.target_modules`` against the model's module tree on the meta device, so a
    wrong name fails before any weight is read."""
    if not run.method.target_modules:
        return
    find_targets(meta_model(run.model), run.method.target_modules)


def check_output_dir(run: RunConfig) -> None:
    out = Path(run.train.output_dir)
    if (out / "metrics.jsonl").exists() and not run.train.resume_from and not run.train.overwrite_output_dir:
        raise ConfigError(f"train.output_dir = {str(out)!r} already holds a run (metrics.jsonl); choose another "
                          "directory, resume it with train.resume_from=latest, or set train.overwrite_output_dir=true")


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int):
    """``transformers.get_scheduler`` for ``train.schedule``; ``constant`` with a warm-up is
    ``constant_with_warmup``. A LambdaLR: DeepSpeed checkpoints its step count, so a resumed run
    continues the same curve."""
    from transformers import get_scheduler

    warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * total_steps)
    name = "constant_with_warmup" if tc.schedule == "constant" and warmup else tc.schedule
    kwargs = dict(tc.scheduler_kwargs)
    if name == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, round(0.1 * total_steps)))
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs=kwargs or None)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.schedule = {tc.schedule!r} with train.scheduler_kwargs = {tc.scheduler_kwargs!r}: "
                          f"{e}") from None


def check_schedule(tc: TrainConfig) -> None:
    """Build the schedule once on a throw-away optimizer, so bad ``scheduler_kwargs`` fail before
    the model loads."""
    make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr), tc, 100)


class StopTraining(Exception):
    """Raised inside ``fit`` when ``train.stop_after_steps`` is reached (after checkpointing)."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} as train.stop_after_steps asks; resume with "
                         "train.resume_from=latest")
        self.step = step


class MetricsWriter:
    """``metrics.jsonl`` on rank 0: one JSON row per log event, flushed per row. ``rows`` counts
    what was written so a resumed run can drop rows logged after its checkpoint."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.rows, self.f = path, enabled, 0, None
        # train.report_to trackers (rank 0 only), fed every row written here: see training/tracking.py
        self.sinks: list = []

    def open(self, keep_rows: int | None) -> None:
        if not self.enabled:
            # Ranks that do not write still count rows: their trainer_state.json (node-local
            # checkpoints: one per node) must say what rank 0's says.
            self.rows = keep_rows or 0
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if keep_rows is not None and self.path.exists():
            kept = self.path.read_text().splitlines(keepends=True)[:keep_rows]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self.rows = len(kept)
        self.f = open(self.path, "a")

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        for sink in list(self.sinks):
            try:
                sink.log(row)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not end the training run
                logger.warning("%s failed (%s: %s); metrics.jsonl keeps every row, this tracker gets no more",
                               type(sink).__name__, type(e).__name__, e)
                self.sinks.remove(sink)
        self.rows += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


class Trainer:
    """One training job as a :class:`RunConfig` describes it. ``run()`` does everything; the
    pieces (``load``, ``build_engine``, ``fit``, ``evaluate``) are public for tests and methods."""

    def __init__(self, run: RunConfig):
        self.run_config = run
        self.rank, self.world, self.local_rank = runtime.init_distributed(run.train.dist_timeout_s)
        # No run directory yet: it is this run's only once locked (see _setup).
        WATCH.start(None, run.train.startup_timeout_s)
        if self.rank != 0:
            logger.setLevel(logging.WARNING)
        # Every rank checks the output directory before any rank writes to it.
        torch.distributed.barrier()
        check_output_dir(run)
        self.run_lock = self._lock_output_dir(run)
        torch.distributed.barrier()
        try:
            self._setup(run)
        except BaseException:
            self.run_lock.release()
            raise

    def _lock_output_dir(self, run: RunConfig) -> RunLock:
        """Rank 0 takes the run directory's lock; every rank learns whether it could (collective)."""
        lock = RunLock(run.train.output_dir)
        error = None
        if self.rank == 0:
            try:
                lock.acquire()
            except ConfigError as e:
                error = e
        failed = torch.tensor(float(error is not None))
        runtime.all_reduce_(failed)
        if error is not None:
            raise error
        if failed.item():
            raise ConfigError(f"train.output_dir = {run.train.output_dir!r}: rank 0 could not take the run "
                              "directory's lock (see its message)")
        return lock

    def _setup(self, run: RunConfig) -> None:
        self.output_dir = Path(run.train.output_dir)
        # A run that finished here is never trained over: resubmitted unchanged it is a no-op.
        self.finished_results = (check_finished(Path(run.train.output_dir), run.to_dict())
                                 if run.train.resume_from and not run.train.overwrite_output_dir else None)
        if self.finished_results is not None:
            return
        WATCH.attach(run.train.output_dir)
        check_targets(run)
        self.precision = runtime.resolve_precision(run.train.precision)
        if run.train.precision == "auto":
            logger.info("train.precision = auto: %s on %s", self.precision, "GPU" if torch.cuda.is_available() else "CPU")
        elif self.precision == "bf16" and not torch.cuda.is_available():
            logger.warning("train.precision=bf16 on CPU: bf16 matmuls are far slower than fp32 on CPUs without bf16 "
                           "instructions (AMX, avx512_bf16); train.precision=auto measures which is faster here")
        self.device = runtime.device()
        self.output_dir = Path(run.train.output_dir)
        torch.manual_seed(run.train.seed)

        logger.info("loading task %s and the tokenizer of %s", run.task.name, run.model.name_or_path)
        check_schedule(run.train)
        self.task = task_of(run.task)
        self.data = load_task_data(self.task, data_source(run.task), run.task.num_train, run.task.num_dev,
                                   run.task.num_test, run.task.seed)
        self.tokenizer = load_tokenizer(run.model)
        if self.task.chat:
            set_chat_template(self.tokenizer, run.task.chat_template,
                              f"the tokenizer of {run.model.tokenizer or run.model.name_or_path}")
        self.hidden_size = getattr(load_config_only(run.model), "hidden_size", None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        add_eos = self.task.kind != "classification"
        self.packs: list[list[int]] | None = None
        self.mix = TaskMix.from_run(run, self.tokenizer)  # several tasks in one run (method.tasks), else None
        if self.mix is not None:
            self.data, self.encoded = self.mix.combined, self.mix.encoded
        else:
            self.encoded, self.length_report = encode_training_set(
                self.tokenizer, self.data.train, run.task.max_length, add_eos, run.task.truncation,
                where=f"task {run.task.name!r}")
            if run.task.packing:
                # A training item is then a pack of consecutive (already shuffled) examples.
                self.packs = pack([len(ids) for ids, _ in self.encoded], run.task.max_length)
                logger.info("task.packing: %d examples in %d sequences of up to %d tokens", len(self.encoded),
                            len(self.packs), run.task.max_length)
        self.model = None
        self.engine = None
        self.scheduler = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.trained: list[torch.nn.Parameter] = []
        # Divergence guard counters: skipped steps in the whole run, and in a row (saved in checkpoints).
        self.bad_steps = 0
        self.consecutive_bad_steps = 0
        self.last_loss = float("nan")  # the last step's mean loss (kept in checkpoints for results.json)
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl", self.rank == 0)
        ckpt_root = Path(run.train.checkpoint_dir or self.output_dir / "checkpoints")
        self.ds_config = self._ds_config(run.train)
        node_local = bool(self.ds_config.get("checkpoint", {}).get("use_node_local_storage", False))
        self.checkpoints = CheckpointManager(ckpt_root, run.train.keep_last, self.rank, self.local_rank, node_local)

    # -- setup -----------------------------------------------------------------------------------
    def _ds_config(self, tc: TrainConfig) -> dict:
        run = self.run_config
        return build_ds_config(run.deepspeed.config, run.deepspeed.overrides, micro_batch_size=tc.micro_batch_size,
                               grad_accum=tc.grad_accum, world_size=self.world, max_grad_norm=tc.max_grad_norm,
                               precision=self.precision, hidden_size=self.hidden_size)

    @property
    def zero3(self) -> bool:
        return zero_stage(self.ds_config) == 3

    def load(self) -> None:
        """Load the base model (partitioned as it loads under ZeRO-3) and apply the method."""
        run = self.run_config
        self.model = load_model(run.model, runtime.torch_dtype(self.precision), self.ds_config)
        api.apply(self.model, run.method)
        if run.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False

    def build_engine(self, tc: TrainConfig, total_steps: int) -> None:
        import deepspeed  # a dependency, imported where used: it takes seconds to import

        self.ds_config = self.run_config.method.deepspeed_config(self._ds_config(tc), self.model)
        logger.info("building the DeepSpeed engine (ZeRO stage %d, %d process%s)", zero_stage(self.ds_config),
                    self.world, "" if self.world == 1 else "es")
        groups = self.run_config.method.optimizer_groups(self.model, tc)
        if not any(g["params"] for g in groups):
            raise ConfigError("the method left no trainable parameter")
        # torch AdamW (fused on CUDA) or a bitsandbytes 8-bit AdamW, handed to DeepSpeed as the client
        # optimizer; ZeRO wraps it (an optimizer outside its tested list needs the flag). The guard
        # can switch its update off for a step with non-finite gradients.
        optimizer = make_skippable(make_optimizer(tc.optimizer, groups, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                                  eps=tc.adam_eps, weight_decay=tc.weight_decay))
        if tc.optimizer != "adamw":
            self.ds_config["zero_allow_untested_optimizer"] = True
        self.optimizer = optimizer
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: make_scheduler(opt, tc, total_steps))
        self.trained = [p for p in self.engine.module.parameters() if p.requires_grad]

    def destroy_engine(self) -> None:
        if self.engine is not None:
            if self.zero3:
                self.engine.empty_partition_cache()
            self.engine.destroy()
            self.engine = None

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict:
        if self.mix is not None:
            return self.mix.evaluate(self, split)
        examples = getattr(self.data, split)
        tc, task_cfg = self.run_config.train, self.run_config.task
        module = self.engine if self.engine is not None else self.model
        out = evaluate(module, self.tokenizer, self.task, examples,
                       batch_size=tc.eval_batch_size or tc.micro_batch_size, max_length=task_cfg.max_length,
                       max_new_tokens=task_cfg.max_new_tokens, device=self.device, rank=self.rank, world=self.world,
                       zero3=self.zero3, eval_metric=tc.eval_metric)
        return out

    # -- the loop ----------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        """Training items the batch plan draws from: examples, or packs of them."""
        return len(self.packs) if self.packs is not None else len(self.encoded)

    def collate(self, idx: list[int]) -> tuple[dict, int]:
        """A micro-batch of training items and its count of real (non-padding) tokens."""
        if self.packs is not None:
            packs = [[self.encoded[i] for i in self.packs[j]] for j in idx]
            batch = pad_packed(packs, self.pad_id, runtime.torch_dtype(self.precision))
            if (self.run_config.model.attn_implementation or "").startswith("flash"):
                # FlashAttention takes no 4D mask; transformers finds the examples from the restarting
                # position ids instead (its packed-sequence path).
                del batch["attention_mask"]
            return batch, sum(len(e[0]) for p in packs for e in p)
        batch = pad([self.encoded[i][0] for i in idx], [self.encoded[i][1] for i in idx], self.pad_id)
        return batch, int(batch["attention_mask"].sum())

    def _forward(self, batch: dict) -> torch.Tensor:
        """One micro-batch's loss (a seam for tests that inject a non-finite loss)."""
        return self.engine(**batch).loss

    def _skip_step(self) -> None:
        """The engine's step with the update made a no-op (see :mod:`.guard`): DeepSpeed still clears
        the gradients and advances its counters, nothing trained or in the optimizer state changes."""
        skipped_before = self.engine.skipped_steps
        self.optimizer.skipping = True
        try:
            self.engine.step()
        finally:
            self.optimizer.skipping = False
        if self.engine.skipped_steps != skipped_before:
            # DeepSpeed's own overflow check (ZeRO, fp16) skipped it and held the schedule back.
            self.scheduler.step()

    def fit(self, stage_index: int, stage_name: str, tc: TrainConfig, plan: BatchPlan, total_steps: int,
            start_step: int, stage_results: dict) -> float:
        """Optimizer steps ``start_step`` .. ``total_steps``; returns the last step's mean loss."""
        engine, device = self.engine, self.device
        multi = len(self._stages) > 1
        bar = None
        if self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=start_step, desc=stage_name if multi else "train", dynamic_ncols=True)
        engine.train()
        # A run resumed at its last step trains nothing: its loss is the one the checkpoint recorded.
        step, last_loss = start_step, (self.last_loss if start_step else float("nan"))
        tag = {"stage": stage_name} if multi else {}
        while step < total_steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            tokens = 0
            micro_batches = plan.micro_batches(step, self.rank)
            for j, idx in enumerate(micro_batches):
                batch, n_tokens = self.collate(idx)
                tokens += n_tokens
                if self.mix is not None:
                    self.mix.activate(self.model, idx)
                loss = self._forward({k: v.to(device) for k, v in batch.items()})
                engine.backward(loss)
                loss_sum += loss.detach().double()
                if j < len(micro_batches) - 1:
                    engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-batch
            step += 1
            # The guard's verdict rides in the loss all-reduce. Under fp16 an inf gradient is DeepSpeed's
            # loss scaler calibrating (it skips those steps itself), so only the loss is checked there.
            grads = local_grads(engine, self.trained) if self.precision != "fp16" else None
            bad_grads = (count_nonfinite(grads, device) if grads is not None
                         else torch.zeros((), dtype=torch.float64, device=device))
            # The pre-clipping gradient norm for metrics.jsonl, from the same local shares (fp16's are
            # loss-scaled: DeepSpeed's own norm is logged there instead).
            grad_sq = (sum_squares(grads, device) if grads is not None
                       else torch.full((), float("nan"), dtype=torch.float64, device=device))
            stats = torch.stack([loss_sum, torch.tensor(float(len(micro_batches)), dtype=torch.float64, device=device),
                                 torch.tensor(float(tokens), dtype=torch.float64, device=device), bad_grads, grad_sq])
            runtime.all_reduce_(stats)
            loss_total, n_micro, n_tokens, n_bad_grads, grad_sq_total = stats.tolist()  # the step's one host transfer
            # ZeRO-1/2/3 ranks hold disjoint shares; without ZeRO every rank holds all of the reduced gradients.
            grad_norm = math.sqrt(grad_sq_total / (self.world if engine.zero_optimization_stage() == 0 else 1))
            last_loss = self.last_loss = loss_total / n_micro
            step_lr = self.scheduler.get_last_lr()[0]
            reason = ("non-finite loss" if not math.isfinite(loss_total) else
                      "non-finite gradient" if n_bad_grads > 0 else None)
            if reason is None:
                engine.step()
                self.consecutive_bad_steps = 0
            else:
                self._skip_step()
                self.bad_steps += 1
                self.consecutive_bad_steps += 1
                logger.warning("step %d: %s, optimizer step skipped (%d in a row, %d in all; lr %g)", step, reason,
                               self.consecutive_bad_steps, self.bad_steps, step_lr)
            elapsed = time.perf_counter() - t0
            if step == start_step + 1:
                logger.info("%s: first optimizer step done in %.1f s", stage_name, elapsed)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if step % tc.log_every == 0 or step == total_steps or reason is not None:
                row = {**tag, "step": step, "epoch": round(plan.epoch_of(step), 4), "loss": last_loss,
                       "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": n_tokens / max(elapsed, 1e-9),
                       "peak_mem_gib": runtime.peak_memory_gib(), "bad_steps": self.bad_steps}
                if math.isnan(grad_norm) and reason is None:
                    grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None and not math.isnan(grad_norm):
                    row["grad_norm"] = float(grad_norm)
                if reason is not None:
                    row.update(skipped=reason, consecutive_bad_steps=self.consecutive_bad_steps)
                self.metrics.write(row)
            max_bad = self.run_config.train.max_bad_steps
            if max_bad and self.consecutive_bad_steps >= max_bad:
                # No checkpoint now: the last one written before the bad run stays `latest`.
                last, _ = newest_intact(self.checkpoints.root)  # "last good" means it verifies
                raise Diverged(step, step_lr, self.consecutive_bad_steps, self.bad_steps, stage_name, reason,
                               str(last) if last is not None else None)
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps and self.data.dev:
                dev = self.evaluate("dev")
                self.metrics.write({**tag, "step": step, **{f"dev/{k}": v for k, v in dev.items()}})
            stopping = tc.stop_after_steps and step - start_step >= tc.stop_after_steps and step < total_steps
            # A step that was skipped writes no periodic checkpoint, so `latest` is always a state reached
            # by a good step (the end of a stage is still saved: the run completed).
            at_end = tc.save_every and step == total_steps
            periodic = tc.save_every and step % tc.save_every == 0 and reason is None
            if at_end or periodic or (stopping and reason is None):
                self.save_checkpoint(stage_index, step, total_steps, stage_results)
            if stopping:
                raise StopTraining(step)
        if bar is not None:
            bar.close()
        return last_loss

    def save_checkpoint(self, stage_index: int, step: int, total_steps: int, stage_results: dict) -> Path:
        state = {"stage": stage_index, "step": step, "total_steps": total_steps, "metrics_rows": self.metrics.rows,
                 "stage_results": stage_results, "world_size": self.world, "bad_steps": self.bad_steps,
                 "consecutive_bad_steps": self.consecutive_bad_steps, "last_loss": self.last_loss,
                 "run_config": self.run_config.to_dict()}
        return self.checkpoints.save(self.engine, stage_index, step, state, self.run_config.model.name_or_path,
                                     self.delta_metadata())

    def delta_metadata(self) -> dict:
        """What export needs beyond the base path: how transformers must load that base."""
        m = self.run_config.model
        kwargs = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        if m.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return {"model_kwargs": kwargs}

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from: ``latest`` is the newest one that verifies against its
        manifest (newer corrupt ones are moved into ``.corrupt/``, and the log says so); a named
        directory must verify. Collective: the writer verifies, every rank learns the outcome."""
        run = self.run_config
        resume = run.train.resume_from
        if not resume:
            return None
        if run.train.overwrite_output_dir and resume == "latest":
            logger.warning("train.overwrite_output_dir=true: starting afresh; train.resume_from=latest is ignored")
            return None
        root = self.checkpoints.root
        error, path = None, None
        if resume != "latest":
            path = Path(resume)
            if not (path / "trainer_state.json").is_file():
                raise ConfigError(f"train.resume_from = {resume!r} is not a complete sparse-ft checkpoint "
                                  "(no trainer_state.json)")
        if self.checkpoints.is_writer:
            try:
                if resume == "latest":
                    path, skipped = newest_intact(root, quarantine=True)
                    for line in skipped:
                        logger.warning("checkpoint failed verification, skipped: %s", line)
                    if skipped and path is not None:
                        logger.warning("resuming from %s, the newest checkpoint that verifies", path)
                        from .checkpoint import LATEST, _write_atomic

                        _write_atomic(root / LATEST, path.name)
                    if path is None and skipped:
                        error = RunError(f"no intact checkpoint in {root} ({'; '.join(skipped)}); start afresh with "
                                         "train.overwrite_output_dir=true or resume a copy that verifies")
                elif not verify(path):
                    logger.warning("%s has no manifest (written by an older sparse-ft): not verified", path)
            except CorruptCheckpoint as bad:
                error = RunError(f"train.resume_from: checkpoint {path} is corrupt ({bad}); resume from another "
                                 "checkpoint or start afresh")
            except OSError as e:
                error = RunError(f"cannot check the checkpoints in {root} ({e}); fix permissions there")
        failed = torch.tensor(float(error is not None))
        runtime.all_reduce_(failed)
        if error is not None:
            raise error
        if failed.item():
            raise RunError(f"the checkpoints in {root} could not be verified (see the writer rank's message)")
        if resume == "latest" and not self.checkpoints.is_writer:
            path = read_latest(root)  # the writer has moved any corrupt newer ones aside
        if path is None:
            logger.info("train.resume_from=latest: no checkpoint in %s yet, starting fresh", root)
        return path

    def _check_same_resume(self, resume_path: Path | None) -> None:
        """Every rank must resume the same checkpoint (or none): with node-local checkpoints a node
        whose disk lacks it would start fresh while the others resume, and the job would hang."""
        if self.world == 1:
            return
        found = [None] * self.world
        torch.distributed.all_gather_object(found, (resume_path.name if resume_path else None, socket.gethostname()))
        if len({tag for tag, _ in found}) > 1:
            where = "; ".join(f"rank {r} on host {host}: {tag or 'none'}" for r, (tag, host) in enumerate(found))
            raise ConfigError(f"train.resume_from = {self.run_config.train.resume_from!r}: the ranks found different "
                              f"checkpoints in {self.checkpoints.root} ({where}). With node-local checkpoints "
                              "every node needs its own copy of the checkpoint directory, at the same path")

    def _clear_old_run(self) -> None:
        """train.overwrite_output_dir=true, starting afresh: the earlier run's checkpoints and final
        files go, so none of them can be taken for this run's (rank 0 / the writers)."""
        import shutil

        root = self.checkpoints.root
        if self.checkpoints.is_writer and root.is_dir():
            for tag in list_checkpoints(root):
                shutil.rmtree(root / tag, ignore_errors=True)
            (root / "latest").unlink(missing_ok=True)
        if self.rank == 0:
            for name in ("results.json", "delta.safetensors"):
                (self.output_dir / name).unlink(missing_ok=True)

    def run(self) -> dict:
        run = self.run_config
        if self.finished_results is not None:
            logger.info("%s: this run finished already (results.json) with this config; nothing to do",
                        self.output_dir)
            self.run_lock.release()
            return self.finished_results
        try:
            return self._run()
        finally:
            self.run_lock.release()

    def _run(self) -> dict:
        run = self.run_config
        self._stages = run.method.stages(run.train)
        resume_path = self._resume_point()
        self._check_same_resume(resume_path)
        resume_state = read_state(resume_path) if resume_path else None
        if resume_state is not None:
            saved = resume_state.get("run_config") or read_run_config(self.output_dir)
            check_resume_config(saved, run.to_dict(), resume_path,
                                diverged=(self.output_dir / DIVERGED_FILE).is_file())
            self.last_loss = resume_state.get("last_loss", float("nan"))
        elif run.train.overwrite_output_dir:
            self._clear_old_run()
            torch.distributed.barrier()
        if resume_state and resume_state.get("world_size", self.world) != self.world:
            logger.warning("resuming a checkpoint written by %d processes with %d: the data order per rank differs",
                           resume_state["world_size"], self.world)
        self.metrics.open(keep_rows=resume_state["metrics_rows"] if resume_state else None)
        if self.rank == 0 and run.train.report_to:
            from .tracking import make_sinks

            self.metrics.sinks = make_sinks(run.train.report_to, self.output_dir, run.train.run_name, run.to_dict(),
                                            resume_state["step"] if resume_state else None)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
            (self.output_dir / DIVERGED_FILE).unlink(missing_ok=True)  # from an earlier attempt in this dir
        self.load()
        startup_barrier()
        results: dict = dict(resume_state["stage_results"]) if resume_state else {}
        results["method"] = run.method.describe(self.model)
        results["precision"] = self.precision
        if self.mix is None:
            rep = self.length_report
            results["data"] = {"train_examples": rep.total - rep.dropped, "prompt_cut": rep.prompt_cut,
                               "dropped": rep.dropped, **({"packs": len(self.packs)} if self.packs is not None else {})}
        resume_stage = resume_state["stage"] if resume_state else -1

        multi = len(self._stages) > 1
        for s, stage in enumerate(self._stages):
            if stage.before is not None:
                stage.before(self, s <= resume_stage)
            if s < resume_stage:
                continue
            tc = stage.train
            plan = (self.mix.plan(tc.micro_batch_size, tc.grad_accum, self.world, tc.seed) if self.mix is not None else
                    BatchPlan(self.n_items, tc.micro_batch_size, tc.grad_accum, self.world, tc.seed))
            total = plan.total_steps(tc.epochs, tc.max_steps)
            if s == resume_stage and resume_state["step"] > total:
                raise ConfigError(f"train.max_steps/epochs: the checkpoint {resume_path} is at step "
                                  f"{resume_state['step']}, past the {total} steps this config runs; allowed: a step "
                                  "budget of at least that many steps")
            self.build_engine(tc, total)
            start = 0
            if s == 0 and run.train.eval_before and self.data.test and resume_state is None:
                # After the engine exists: under ZeRO-3 only its hooks gather the weights.
                before = self.evaluate("test")
                results["test_before"] = before
                self.metrics.write({"step": 0, **{f"test_before/{k}": v for k, v in before.items()}})
                logger.info("test before training: %s", before)
            if s == resume_stage:
                state = self.checkpoints.load(self.engine, resume_path)
                start = state["step"]
                self.bad_steps = state.get("bad_steps", 0)
                self.consecutive_bad_steps = state.get("consecutive_bad_steps", 0)
                logger.info("resumed from %s at stage %d step %d", resume_path, s, start)
            else:
                self.consecutive_bad_steps = 0  # a new stage starts a new optimizer
            stage_results: dict = {}
            prefix = f"{stage.name}/" if multi else ""
            results[f"{prefix}train_loss"] = self.fit(s, stage.name, tc, plan, total, start,
                                                      {k: v for k, v in results.items() if k != "method"})
            results[f"{prefix}steps"] = total
            results["bad_steps"] = self.bad_steps
            for split in ("dev", "test"):
                if getattr(self.data, split):
                    stage_results[split] = self.evaluate(split)
                    self.metrics.write({**({"stage": stage.name} if multi else {}), "step": total,
                                        **{f"{split}/{k}": v for k, v in stage_results[split].items()}})
                    logger.info("%s after %s: %s", split, stage.name, stage_results[split])
            for split, value in stage_results.items():
                results[f"{prefix}{split}"] = value
                results[split] = value
            if s < len(self._stages) - 1:
                self.destroy_engine()

        if run.train.save_delta:
            save_delta(self.engine.module, self.output_dir / "delta.safetensors", base_model=run.model.name_or_path,
                       engine=self.engine, extra_metadata=self.delta_metadata())
        if self.rank == 0:
            tmp = self.output_dir / f"results.json.tmp{os.getpid()}"
            try:
                tmp.write_text(json.dumps(results, indent=2))
                os.replace(tmp, self.output_dir / "results.json")
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise RunError(f"writing {self.output_dir / 'results.json'} failed ({e.strerror or e}); free space "
                               "there and resubmit with train.resume_from=latest (the final checkpoint is kept)"
                               ) from e
        self.metrics.close()
        return results


def train(run: RunConfig) -> dict:
    """Run one training job as the config says; returns the final metrics (same on every rank),
    ``{"stopped_at_step": N}`` when ``train.stop_after_steps`` ended it early, or
    ``{"diverged": {...}}`` (also written to ``output_dir/diverged.json``) when the divergence guard
    stopped it after ``train.max_bad_steps`` consecutive non-finite steps."""
    try:
        trainer = Trainer(run)
        result = trainer.run()
    except StopTraining as stop:
        logger.info(str(stop))
        trainer.metrics.close()
        _end_watch()
        WATCH.succeeded()
        return {"stopped_at_step": stop.step}
    except Diverged as diverged:
        _end_watch()
        WATCH.diverged()
        record = diverged.record()
        if trainer.rank == 0:
            logger.error(str(diverged))
            trainer.metrics.write({"step": diverged.step, "diverged": True, **{k: v for k, v in record.items()
                                                                              if k != "step"}})
            tmp = trainer.output_dir / (DIVERGED_FILE + ".tmp")
            tmp.write_text(json.dumps({**record, "message": str(diverged)}, indent=2))
            os.replace(tmp, trainer.output_dir / DIVERGED_FILE)
        trainer.metrics.close()
        return {"diverged": record}
    except BaseException as error:
        # Every other rank stops within seconds, naming this rank, its host and the error.
        WATCH.failed(error)
        raise
    _end_watch()
    WATCH.succeeded()
    return result


def _end_watch() -> None:
    """Stop watching for failures, then wait for every rank: past this barrier a rank that exits
    (rank 0 holds the rendezvous store) is the normal end, not a failure."""
    WATCH.stop()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
