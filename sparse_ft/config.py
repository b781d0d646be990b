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
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import MethodConfig, RandomMaskConfig, config_from_dict

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("constant", "linear")


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
    """Task registry name: sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop,
    instruction."""

    data_dir: str | None = None
    """Local folder of jsonl files in the hub's schema (``<data_dir>/<task>/train.jsonl`` and
    ``validation.jsonl``). None loads from the Hugging Face hub."""

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
    """``constant`` (paper 002) or ``linear`` (warm up, then decay to zero)."""

    warmup_steps: int = 0
    """Linear warm-up steps (both schedules)."""

    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all steps; used when ``warmup_steps`` is 0."""

    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""

    precision: str = "auto"
    """``bf16``, ``fp16``, ``fp32``, or ``auto``: bf16 on GPUs that support it, fp32 on CPU (bf16
    matmuls are far slower than fp32 on CPUs)."""

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
    launch/README.md)."""

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
        hint = next(a for a in args if a is not type(None))
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
    from .tasks import get_task
    from .tasks.data import check_local_files

    m, t, tr = run.model, run.task, run.train
    if not m.name_or_path:
        raise ConfigError("model.name_or_path is required: a hub id such as facebook/opt-1.3b or a local directory")
    looks_local = m.name_or_path.startswith(("/", "./", "../", "~")) or os.path.exists(m.name_or_path)
    if looks_local and not Path(m.name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: local directory {m.name_or_path} does not exist")
    if m.gguf_file and looks_local and not (Path(m.name_or_path).expanduser() / m.gguf_file).is_file():
        raise ConfigError(f"model.gguf_file: {m.gguf_file} not found in {m.name_or_path}")
    task = get_task(t.name, prompt_field=t.prompt_field, response_field=t.response_field)
    if t.data_dir is not None:
        check_local_files(t.data_dir, task)
    elif task.hub_path is None:
        raise ConfigError(f"task.data_dir is required for task {t.name!r} (a folder with train.jsonl)")
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
    from .training.guard import check_max_bad_steps

    check_max_bad_steps(tr.max_bad_steps)
    if tr.max_grad_norm < 0:
        raise ConfigError(f"train.max_grad_norm = {tr.max_grad_norm}; allowed: >= 0 (0 disables)")
    from .training.ds_config import resolve_ds_config_path

    resolve_ds_config_path(run.deepspeed.config)
    validate_quantization(run)


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
    from .quant import OPTIMIZERS, QUANT_DTYPES, QUANTIZATIONS, require_bnb
    from .training.ds_config import offloaded

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
    from .training.ds_config import zero_settings

    return int(zero_settings(run.deepspeed.config, run.deepspeed.overrides).get("stage", 0))
