"""The training config: one YAML file with five sections, each a typed dataclass.

``model`` (what to load), ``method`` (what to train; see :mod:`sparse_ft.methods`), ``task`` (data
and prompts), ``train`` (the loop) and ``deepspeed`` (which ``ds_configs/*.json`` and overrides).
Command-line ``key=value`` pairs override the file (``train.lr=1e-2``, ``method.density=1e-4``).
Every key is checked against the dataclasses: an unknown one fails with the allowed names.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import MethodConfig, RandomMaskConfig, config_from_dict
from .quant import OPTIMIZERS, QUANT_DTYPES, QUANTIZATIONS, require_bnb
from .tasks import TASKS, get_task
from .tasks.chat import check_template_name
from .tasks.data import DataSource, check_data_files, check_local_files
from .tasks.encode import TRUNCATIONS
from .training.ds_config import offloaded, resolve_ds_config_path, zero_settings
from .training.evaluate import EVAL_METRICS
from .training.guard import check_max_bad_steps
from .training.tracking import check_report_to

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "warmup_stable_decay")


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub id (``facebook/opt-1.3b``) or local directory of the base causal LM."""

    gguf_file: str | None = None
    """GGUF file name inside ``name_or_path`` to load (dequantised by transformers), if the model is
    shipped as GGUF."""

    tokenizer: str | None = None
    """Tokenizer hub id or directory; defaults to ``name_or_path``."""

    trust_remote_code: bool = False
    """Passed to transformers' ``from_pretrained``."""

    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``...; None lets transformers choose."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    quantization: str = "none"
    """Load the frozen base quantized by bitsandbytes: ``nf4`` (4-bit NormalFloat), ``int8``
    (LLM.int8) or ``none``. Every linear layer but the output head is quantized; what the method
    trains stays in fp32/bf16. Not with ``method.name=full``, GGUF bases or ZeRO offload configs.
    Each rank loads the quantized model whole (ZeRO-3's partitioned loading is skipped)."""

    double_quant: bool = True
    """``nf4``: also quantize the per-block scales (QLoRA's double quantization, about 0.37 fewer
    bits per weight)."""

    quant_compute_dtype: str = "auto"
    """``nf4``: dtype the dequantized weights are computed in (and the packed weights' storage
    dtype, which ZeRO-3 needs equal to the model's): ``auto`` (the run's precision), ``bf16``,
    ``fp16`` or ``fp32`` (use fp32 on CPU)."""


@dataclass
class TaskConfig:
    name: str = "sst2"
    """Task registry name: sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop
    (built-in templates), instruction (prompt/response rows), alpaca (instruction, input, output)
    or messages (chat conversations); see docs/data.md."""

    data_dir: str | None = None
    """Local folder of jsonl files in the hub's schema (``<data_dir>/<task>/train.jsonl`` and
    ``validation.jsonl``). None loads from the Hugging Face hub."""

    data_files: str | dict | None = None
    """Local data files read with ``datasets.load_dataset``: json, jsonl, parquet or csv. A path or
    glob (the train split), or a mapping of split name to path/glob (``{train: a.jsonl,
    validation: b.jsonl}``). Takes precedence over ``dataset`` and ``data_dir``."""

    dataset: str | None = None
    """A dataset for ``datasets.load_dataset``: hub id (``tatsu-lab/alpaca``), local dataset
    directory, or a folder written by ``Dataset.save_to_disk``. Built-in tasks read it with their
    template (e.g. a mirror of SST-2)."""

    subset: str | None = None
    """Configuration (subset) name of ``dataset``."""

    split: str = "train"
    """Split of ``dataset``/``data_files`` to train on (train and dev examples are drawn from it)."""

    test_split: str | None = None
    """Split the test examples come from; default ``validation`` (taken from the train split,
    after train and dev, when it does not exist)."""

    columns: dict = field(default_factory=dict)
    """Rename the data's columns to the names the task reads: ``{template column: your column}``,
    e.g. ``{instruction: question, output: answer}`` for alpaca or ``{messages: conversations}``."""

    chat_template: str = "auto"
    """alpaca and messages tasks: ``auto`` (the tokenizer's chat template; an error if it has
    none), a built-in one (``chatml``, ``alpaca``) or a Jinja template string."""

    system_prompt: str | None = None
    """alpaca and messages tasks: system message put first in every conversation that has none."""

    truncation: str = "left"
    """Training examples longer than ``max_length``: ``left`` cuts the prompt (earlier turns) from
    the left and keeps the answer whole, ``drop`` leaves the example out. Either way they are counted
    and logged; an example whose last answer alone does not fit is always dropped, never cut."""

    packing: bool = False
    """Pack consecutive short training examples into sequences of up to ``max_length`` tokens;
    attention stays within each example (block-diagonal mask, position ids restart), so the loss
    equals the unpacked one. Fewer padded tokens, fewer steps per epoch."""

    num_train: int = 1000
    """Training examples sampled from the train split (MeZO protocol: 1000); -1 for all."""

    num_dev: int = 500
    """Dev examples sampled from the rest of the train split, for evaluation during training."""

    num_test: int = 1000
    """Test examples sampled from the validation split, evaluated at the end."""

    max_length: int = 256
    """Longest tokenised prompt + answer; prompts are cut from the left beyond it."""

    seed: int = 0
    """Seed of the few-shot sampling (independent of the training seed)."""

    prompt_field: str = "prompt"
    """instruction task: the jsonl field holding the prompt."""

    response_field: str = "response"
    """instruction task: the jsonl field holding the response."""

    max_new_tokens: int = 50
    """Generation tasks (squad, drop): longest generated answer at evaluation."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where metrics.jsonl, checkpoints and the final delta go."""

    epochs: float = 5.0
    """Passes over the training examples (paper 002: 5)."""

    max_steps: int = -1
    """Optimizer steps to run; overrides ``epochs`` when > 0."""

    micro_batch_size: int = 8
    """Examples per GPU (per process) per forward pass."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    lr: float = 1e-3
    """Peak learning rate. Sparse masks want large rates (paper 002: up to 1e-1 at 0.001%)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.999
    """AdamW beta2."""

    adam_eps: float = 1e-8
    """AdamW epsilon."""

    optimizer: str = "adamw"
    """``adamw`` (torch AdamW), ``adamw8bit`` or ``paged_adamw8bit`` (bitsandbytes: Adam's two
    moments in 8 bits, 2 bytes per trained entry instead of 8; paged moves them to host memory
    under GPU memory pressure, and is plain ``adamw8bit`` on CPU). Needs bitsandbytes; works for
    every method, ``full`` included. The ``adam_*`` and ``weight_decay`` keys apply to all three."""

    schedule: str = "constant"
    """Learning-rate schedule, built by ``transformers.get_scheduler``: ``constant`` (paper 002),
    ``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial`` or
    ``warmup_stable_decay``. ``constant`` with a warm-up is ``constant_with_warmup``."""

    warmup_steps: int = 0
    """Warm-up steps (the learning rate rises linearly from 0). Not together with ``warmup_ratio``."""

    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the stage's steps (rounded up). Not together with ``warmup_steps``."""

    scheduler_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the schedule (``scheduler_specific_kwargs`` of ``get_scheduler``), e.g.
    ``{num_cycles: 2}`` (cosine_with_restarts), ``{power: 2, lr_end: 1e-7}`` (polynomial),
    ``{num_decay_steps: 100}`` (warmup_stable_decay; default: the last 10% of steps)."""

    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""

    precision: str = "auto"
    """``bf16``, ``fp16``, ``fp32``, or ``auto``: bf16 on GPUs that support it; on CPU bf16 where
    this CPU's bf16 matmuls are clearly faster than fp32 (AMX, avx512_bf16), else fp32 (measured
    once per machine, cached in ``$SPARSE_FT_CACHE``). Set fp32 where exact arithmetic matters."""

    eval_every: int = 0
    """Evaluate on the dev split every N optimizer steps; 0: only at the end."""

    eval_before: bool = False
    """Also evaluate on the test split before the first step (a zero-shot baseline)."""

    eval_batch_size: int = 0
    """Examples per evaluation batch; 0 uses ``micro_batch_size``."""

    log_every: int = 1
    """Write a metrics.jsonl row (and update the bar) every N optimizer steps."""

    seed: int = 0
    """Seed of data order, dropout and any method initialisation that draws from torch."""

    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps and at the end of each stage; 0: none.
    A checkpoint holds only what trains plus optimizer, scheduler and RNG state, never the base."""

    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted once a newer one is complete."""

    checkpoint_dir: str | None = None
    """Where checkpoints go; default ``<output_dir>/checkpoints``. May be node-local storage (see
    docs/multi-node.md)."""

    resume_from: str | None = None
    """``latest`` (the newest checkpoint in ``checkpoint_dir`` that verifies against its manifest; a
    fresh start when there is none, so a pre-empted job can be resubmitted unchanged; a finished run
    resubmitted unchanged does nothing) or a checkpoint directory. The config must be the one that
    made the checkpoint, except the step budget, eval/save/log cadence and paths."""

    stop_after_steps: int = 0
    """Stop this process after this many optimizer steps of the current stage (writing a checkpoint
    first), e.g. to split a long run over several job allocations; continue it with
    ``resume_from=latest``. 0: run to the end."""

    overwrite_output_dir: bool = False
    """Start afresh in an ``output_dir`` that already holds a run, finished or not: its metrics.jsonl
    is replaced, its checkpoints, results.json and delta are removed, ``resume_from=latest`` is
    ignored. Off by default so a typo cannot wipe a run."""

    save_delta: bool = True
    """Write ``delta.safetensors`` (the compact delta) to ``output_dir`` at the end."""

    max_bad_steps: int = 10
    """Divergence guard: an optimizer step whose loss or trained gradients hold a NaN or inf is skipped
    (values and optimizer state untouched; its batch is consumed and the LR schedule moves on) and
    logged in metrics.jsonl (``skipped``, ``bad_steps``). This many skipped steps in a row stop the
    run: ``diverged.json`` is written, the last checkpoint taken before them is kept, and
    ``sparse-ft train`` exits with code 3. 0: never stop (bad steps are still skipped)."""

    dist_timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, barrier, ZeRO-3 gather) may wait for the other ranks before
    it fails; passed to ``deepspeed.init_distributed``. A rank that fails with a Python error ends
    the job on every node within seconds anyway (see docs/multi-node.md); this bounds the wait for
    a rank that hangs or dies without one."""

    startup_timeout_s: float = 300.0
    """After the model is loaded, every rank waits at most this long for the slowest one; a rank
    that has not arrived by then (killed, hung in its load) is named and the job stops."""

    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every metrics.jsonl row (rank 0): any of ``tensorboard``
    (``<output_dir>/tensorboard``), ``wandb`` (``<output_dir>/wandb``; ``WANDB_MODE=offline`` needs no
    network) and ``csv`` (``<output_dir>/metrics.csv``). Empty: metrics.jsonl only."""

    run_name: str | None = None
    """The run's name in TensorBoard and W&B; default: the name of ``output_dir``."""

    eval_metric: str = "mean_logprob"
    """How classification evaluation scores each option: ``mean_logprob`` (mean log-likelihood per
    token of the option), or lm-evaluation-harness's ``acc`` (summed log-likelihood) or ``acc_norm``
    (summed log-likelihood divided by the option's length in UTF-8 bytes). The highest-scoring
    option is the prediction; the metric reported is still ``accuracy``."""

    def override(self, values: dict, where: str) -> "TrainConfig":
        """A copy with ``values`` (train keys, as a method's per-stage settings give them) applied,
        checked and coerced like the train section; errors name ``where.<key>``. The run-wide keys
        (:data:`RUN_WIDE`) cannot differ per stage."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where} = {values!r}; allowed: a mapping of train keys, e.g. {{lr: 1e-4, epochs: 5}}")
        allowed = [f.name for f in dataclasses.fields(self) if f.name not in RUN_WIDE]
        hints = typing.get_type_hints(type(self))
        out = {}
        for key, value in values.items():
            if key in RUN_WIDE:
                raise ConfigError(f"{where}.{key}: train.{key} is set for the whole run, not per stage")
            if key not in allowed:
                raise ConfigError(f"{where}.{key} is not a train key; allowed: {', '.join(allowed)}")
            out[key] = _coerce(where, key, value, hints[key])
        return dataclasses.replace(self, **out)


# Train settings that belong to the whole run, not to one stage of a method's pipeline.
RUN_WIDE = ("output_dir", "checkpoint_dir", "resume_from", "overwrite_output_dir", "save_delta", "precision",
            "keep_last", "eval_before")


@dataclass
class DeepSpeedSection:
    config: str = "zero3"
    """A file in ``ds_configs/`` by name (zero0, zero2, zero3, zero3_offload) or a path to a
    DeepSpeed JSON. Its ``"auto"`` values are filled from this training config."""

    overrides: dict = field(default_factory=dict)
    """Keys merged into the DeepSpeed JSON after filling (nested dicts merge), e.g.
    ``{zero_optimization: {stage3_max_live_parameters: 1e8}}``."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=RandomMaskConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.model),
            "method": self.method.to_dict(),
            "task": dataclasses.asdict(self.task),
            "train": dataclasses.asdict(self.train),
            "deepspeed": dataclasses.asdict(self.deepspeed),
        }


SECTIONS = {"model": ModelConfig, "task": TaskConfig, "train": TrainConfig, "deepspeed": DeepSpeedSection}


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    where = f"{section}.{key}"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) > 1:  # e.g. str | dict: the first type the value fits
            for choice in choices:
                if choice is dict and isinstance(value, dict) or choice is not dict and not isinstance(value, dict):
                    return _coerce(section, key, value, choice)
        hint = choices[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} = {value!r}; allowed: true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} = {value!r}; allowed: an integer")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where} = {value!r}; allowed: an integer") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where} = {value!r}; allowed: an integer")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}; allowed: a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} = {value!r}; allowed: a number") from None
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} = {value!r}; allowed: a string")
        return str(value)
    if hint is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} = {value!r}; allowed: a mapping")
    return value


def _section(name: str, cls: type, values: Any):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {values!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            raise ConfigError(f"{name}.{key} is not a config key" + (f" (did you mean {name}.{hint[0]}?)" if hint else "")
                              + f"; allowed in {name}: {', '.join(allowed)}")
        kwargs[key] = _coerce(name, key, value, hints[key])
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {dotted!r} must look like section.key=value (e.g. train.lr=1e-2)")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} must look like section.key=value (e.g. train.lr=1e-2)")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def from_dict(tree: dict) -> RunConfig:
    if not isinstance(tree, dict):
        raise ConfigError("the config file must hold a mapping with sections model, method, task, train, deepspeed")
    allowed = ["model", "method", "task", "train", "deepspeed"]
    for key in tree:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            raise ConfigError(f"{key!r} is not a config section" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; allowed: {', '.join(allowed)}")
    run = RunConfig(**{name: _section(name, cls, tree.get(name)) for name, cls in SECTIONS.items()},
                    method=config_from_dict(tree.get("method") or {"name": "random_mask"}))
    validate(run)
    return run


def output_dir_of(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """``train.output_dir`` of a config file with overrides, without building or checking the rest
    (launchers and error reports need the run directory of a config that may not validate)."""
    tree = yaml.safe_load(Path(path).read_text()) or {}
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    train = tree.get("train") if isinstance(tree, dict) else None
    return Path(str((train if isinstance(train, dict) else {}).get("output_dir") or TrainConfig.output_dir))


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, build and validate the dataclasses."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    return from_dict(tree)


def validate(run: RunConfig) -> None:
    """Checks that need no model: ranges, names, files. Raises ConfigError naming the field."""
    m, t, tr = run.model, run.task, run.train
    if not m.name_or_path:
        raise ConfigError("model.name_or_path is required: a hub id such as facebook/opt-1.3b or a local directory")
    looks_local = m.name_or_path.startswith(("/", "./", "../", "~")) or os.path.exists(m.name_or_path)
    if looks_local and not Path(m.name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: local directory {m.name_or_path} does not exist")
    if m.gguf_file and looks_local and not (Path(m.name_or_path).expanduser() / m.gguf_file).is_file():
        raise ConfigError(f"model.gguf_file: {m.gguf_file} not found in {m.name_or_path}")
    task = task_of(t)
    validate_data(t, task)
    if t.num_train == 0:
        raise ConfigError("task.num_train = 0; allowed: a positive count or -1 for all")
    if t.max_length < 8:
        raise ConfigError(f"task.max_length = {t.max_length}; allowed: >= 8")
    if tr.precision not in PRECISIONS:
        raise ConfigError(f"train.precision = {tr.precision!r}; allowed: {', '.join(PRECISIONS)}")
    if tr.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule = {tr.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    check_finite(run)
    if tr.lr <= 0:
        raise ConfigError(f"train.lr = {tr.lr}; allowed: > 0")
    if tr.save_every < 0 or tr.keep_last < 1:
        raise ConfigError(f"train.save_every = {tr.save_every}, train.keep_last = {tr.keep_last}; allowed: "
                          "save_every >= 0 (0: no checkpoints), keep_last >= 1")
    if tr.resume_from not in (None, "latest") and not Path(tr.resume_from).is_dir():
        raise ConfigError(f"train.resume_from = {tr.resume_from!r}; allowed: latest, or an existing checkpoint "
                          "directory")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(tr, key) < 1:
            raise ConfigError(f"train.{key} = {getattr(tr, key)}; allowed: >= 1")
    if tr.max_steps <= 0 and tr.epochs <= 0:
        raise ConfigError("train.epochs must be > 0 when train.max_steps is not set")
    if not 0 <= tr.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio = {tr.warmup_ratio}; allowed: [0, 1)")
    if tr.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps = {tr.warmup_steps}; allowed: >= 0")
    if tr.warmup_steps and tr.warmup_ratio:
        raise ConfigError(f"train.warmup_steps = {tr.warmup_steps} and train.warmup_ratio = {tr.warmup_ratio}: "
                          "set one of them, not both")
    if t.packing and getattr(run.method, "tasks", None):
        raise ConfigError("task.packing with method.tasks (multi-task): a packed sequence would mix tasks; "
                          "set task.packing=false")
    check_max_bad_steps(tr.max_bad_steps)
    tr.report_to = check_report_to(tr.report_to)
    if tr.eval_metric not in EVAL_METRICS:
        raise ConfigError(f"train.eval_metric = {tr.eval_metric!r}; allowed: {', '.join(EVAL_METRICS)}")
    for name in ("dist_timeout_s", "startup_timeout_s"):
        if not getattr(tr, name) > 0:
            raise ConfigError(f"train.{name} = {getattr(tr, name)}; allowed: a number of seconds > 0")
    if tr.max_grad_norm < 0:
        raise ConfigError(f"train.max_grad_norm = {tr.max_grad_norm}; allowed: >= 0 (0 disables)")
    resolve_ds_config_path(run.deepspeed.config)
    validate_quantization(run)
    check_method(run.method, run.train)


def check_method(method: MethodConfig, train: TrainConfig) -> None:
    """What a method config cannot check itself, because it needs layers above the methods: the task
    names it trains on (multi-task ProPETL) against the task registry, and its stages' own train
    settings (LoReML's ``stage1``/``stage2``), by building them from ``train``."""
    unknown = [t for t in method.task_names() if t not in TASKS]
    if unknown:
        raise ConfigError(f"method.tasks: {unknown} are not tasks; allowed: {', '.join(sorted(TASKS))}")
    method.stages(train)


def task_of(t: TaskConfig, name: str | None = None):
    """The task object a TaskConfig describes (``name`` overrides ``t.name`` for multi-task runs)."""
    return get_task(name or t.name, prompt_field=t.prompt_field, response_field=t.response_field,
                    system_prompt=t.system_prompt)


def data_source(t: TaskConfig):
    """Where the task's rows come from, as :func:`sparse_ft.tasks.load_task_data` takes it."""
    return DataSource(data_dir=t.data_dir, dataset=t.dataset, subset=t.subset, split=t.split,
                      test_split=t.test_split, data_files=t.data_files, columns=dict(t.columns))


def validate_data(t: TaskConfig, task) -> None:
    """The data keys, checked without reading any row: files exist, names are known."""
    if t.data_files is not None:
        if not isinstance(t.data_files, (str, dict)) or not t.data_files:
            raise ConfigError(f"task.data_files = {t.data_files!r}; allowed: a path or glob, or a mapping of split "
                              "name to path/glob")
        check_data_files(t.data_files, t.split)
    elif t.dataset:
        pass  # a hub id or local dataset: resolved by datasets when the data loads (before the model)
    elif t.data_dir is not None:
        check_local_files(t.data_dir, task)
    elif task.hub_path is None:
        raise ConfigError(f"task {t.name!r} needs data: set task.data_files (json, jsonl, parquet or csv files), "
                          "task.dataset (a hub id or saved dataset) or task.data_dir (a folder with train.jsonl)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in t.columns.items()):
        raise ConfigError(f"task.columns = {t.columns!r}; allowed: a mapping of template column to your column name")
    if t.columns and task.columns:
        unknown = [k for k in t.columns if k not in task.columns and k != "input"]
        if unknown:
            raise ConfigError(f"task.columns: {unknown[0]!r} is not a column task {t.name!r} reads; allowed keys: "
                              f"{', '.join(task.columns + (('input',) if t.name == 'alpaca' else ()))}")
    if t.truncation not in TRUNCATIONS:
        raise ConfigError(f"task.truncation = {t.truncation!r}; allowed: {', '.join(TRUNCATIONS)}")
    check_template_name(t.chat_template)


def check_finite(run: RunConfig) -> None:
    """NaN and inf pass every ``<``/``>`` range check (NaN compares false), so numbers are checked
    for finiteness first; and a method that targets layers needs at least one target."""
    import math

    for section in ("model", "task", "train"):
        for f in dataclasses.fields(getattr(run, section)):
            value = getattr(getattr(run, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} = {value}; allowed: a finite number")
    for f in dataclasses.fields(run.method):
        value = getattr(run.method, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"method.{f.name} = {value}; allowed: a finite number")
    targets = next(f for f in dataclasses.fields(run.method) if f.name == "target_modules")
    default = targets.default_factory() if targets.default_factory is not dataclasses.MISSING else targets.default
    if not run.method.target_modules and default:
        raise ConfigError(f"method.target_modules = []; allowed: a non-empty list of module names (default for "
                          f"{run.method.method}: {default})")


def validate_quantization(run: RunConfig) -> None:
    """The quantized-base and 8-bit-optimizer settings, and the combinations that cannot work."""
    m, tr = run.model, run.train
    if m.quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization = {m.quantization!r}; allowed: {', '.join(QUANTIZATIONS)}")
    if m.quant_compute_dtype not in QUANT_DTYPES:
        raise ConfigError(f"model.quant_compute_dtype = {m.quant_compute_dtype!r}; allowed: {', '.join(QUANT_DTYPES)}")
    if tr.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer = {tr.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    offload = offloaded(run.deepspeed.config, run.deepspeed.overrides)
    if m.quantization != "none":
        run.method.check_quantized(m.quantization)
        if m.gguf_file:
            raise ConfigError(f"model.quantization = {m.quantization} with model.gguf_file: a GGUF base is already "
                              "quantized and transformers dequantizes it on load; bitsandbytes cannot requantize it "
                              "there. Use model.quantization=none, or an unquantized (safetensors) base")
        if offload:
            raise ConfigError(f"model.quantization = {m.quantization} with deepspeed.config = {run.deepspeed.config}, "
                              f"which offloads {' and '.join(offload)} to {'/'.join(sorted(set(offload.values())))}: "
                              "bitsandbytes' packed weights and their quantization state cannot be offloaded by "
                              "DeepSpeed; allowed: zero0, zero2, zero3 (a quantized 13B base fits one 24 GB GPU)")
        if m.quantization == "int8" and _zero_stage(run) == 3:
            raise ConfigError(f"model.quantization = int8 with ZeRO-3 (deepspeed.config = {run.deepspeed.config}): "
                              "int8 weights cannot be flattened with the model's floating-point parameters for "
                              "partitioning; use model.quantization=nf4 (its packed storage has the model's dtype) "
                              "or a zero0/zero2 config")
        require_bnb(f"model.quantization = {m.quantization}")
    if tr.optimizer != "adamw":
        if "optimizer" in offload:
            raise ConfigError(f"train.optimizer = {tr.optimizer} with deepspeed.config = {run.deepspeed.config}, which "
                              "offloads the optimizer: DeepSpeed then runs its own CPU Adam; allowed with offload: "
                              "train.optimizer=adamw")
        require_bnb(f"train.optimizer = {tr.optimizer}")


def _zero_stage(run: RunConfig) -> int:
    return int(zero_settings(run.deepspeed.config, run.deepspeed.overrides).get("stage", 0))
