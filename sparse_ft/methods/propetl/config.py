"""ProPETL (Zeng et al., "One Network, Many Masks", paper 003): one PETL module, the *prototype*,
shared by every layer; each layer uses ``prototype * m_l`` with a learned binary mask ``m_l``.

Two prototype kinds: ``lora`` (a LoRA pair per targeted projection, q and v by default; paper: r 32,
alpha 48, keep 0.1 here) and ``adapter`` (a Pfeiffer adapter after the feed-forward block; paper:
bottleneck 64, keep 0.5). The masks are the top-k of per-layer float scores, trained with a
straight-through gradient at their own learning rate (paper Table 8: 3e-2 for LoRA, 3e-3 for the
adapter, with 1e-4 for the prototype; Table 10: ten times the prototype's rate).

Multi-task (``tasks``): a mask per task OR'ed with the layer masks, ``m = 1 - (1 - m_task)(1 - m_layer)``,
k = 0.3 each; batches come from a mix of the tasks (see :mod:`sparse_ft.training.multitask`).

After training the compact delta keeps only the prototype (fp32) and bit-packed masks: the
Bit-Level Storage (paper eq. 2) the log line and ``metrics.jsonl`` report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...delta_file import read_delta, save_safetensors, tensor_sha256
from ...errors import ConfigError
from ...zero import full_numel, full_shape
from ..base import (ALL_LINEAR, REGEX_PREFIX, MethodConfig, Stage, count_parameters, matches, name_seed,
                    replace_module)
from .layer import (ACTIVATIONS, SHARED_ATTR, AdapterPrototype, LoRAPrototype, ProPETLAdapterLinear,
                    ProPETLLoRALinear, ProPETLShared, ScoreSet, _ProPETLLayer, hybrid_mask, keep_count,
                    pack_bits, unpack_bits)

PROTOTYPES = ("lora", "adapter")
# The feed-forward block's output projection, by architecture: LLaMA/Mistral/Qwen, OPT, GPT-NeoX.
FFN_OUTPUTS = ("down_proj", "fc2", "dense_4h_to_h")
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj"]


@dataclass
class ProPETLConfig(MethodConfig):
    method: ClassVar[str] = "propetl"

    target_modules: list[str] = field(default_factory=list)
    """Empty: the prototype kind's default. ``lora``: the projections to adapt (default q_proj,
    v_proj); each name gets its own prototype, shared by all layers. ``adapter``: the feed-forward
    block's output projection, found automatically (down_proj in LLaMA-style models, fc2 in OPT,
    dense_4h_to_h in GPT-NeoX); name it here for other architectures."""

    prototype: str = "lora"
    """``lora`` (LoRA on the targets, mergeable into the base weights) or ``adapter`` (a Pfeiffer
    adapter after the feed-forward block; not mergeable, see docs/methods/propetl.md)."""

    r: int = 32
    """``lora``: rank of the prototype (paper 003: 32)."""

    alpha: float = 48.0
    """``lora``: the update is ``(alpha / r) (B*m_B)(A*m_A)``. The paper raises alpha from 32 to 48 for
    ProPETL because masking shrinks the update's norm."""

    bottleneck: int = 64
    """``adapter``: bottleneck width of the prototype adapter (paper 003: 64)."""

    activation: str = "relu"
    """``adapter``: non-linearity between down- and up-projection: relu, gelu, silu or tanh."""

    keep_ratio: float | None = None
    """Fraction k of each prototype tensor a layer's mask keeps (top-k of |scores|), in (0, 1].
    Default: 0.1 for ``lora``, 0.5 for ``adapter``, 0.3 for the layer masks of a multi-task run."""

    tasks: list[str] = field(default_factory=list)
    """Multi-task ProPETL: the task names (``sst2``, ``rte``...) trained together in one run, each with
    its own task mask, batches drawn from their mix and each evaluated on its own. The run's ``task``
    section supplies the data settings they share (data_dir, num_train, max_length...); set its
    ``name`` to one of them (it is still checked). Empty: single task."""

    task_keep_ratio: float = 0.3
    """Multi-task: fraction each task mask keeps, in (0, 1] (paper 003: 0.3, with 0.3 for the layer
    masks, so a hybrid mask keeps about half)."""

    score_lr: float | None = None
    """Learning rate of the mask scores (their own optimizer group; schedule as ``train.lr``). Default:
    ten times ``train.lr`` (paper 003, Table 10; Table 8 uses 3e-3 adapter, 3e-2 LoRA with 1e-4)."""

    seed: int = 0
    """Seed of the prototype and score initialisation, per module name: identical on every rank."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prototype not in PROTOTYPES:
            raise ConfigError(f"method.prototype = {self.prototype!r}; allowed: {', '.join(PROTOTYPES)}")
        if self.prototype == "lora" and not self.target_modules:
            self.target_modules = list(DEFAULT_LORA_TARGETS)
        for name in ("r", "bottleneck"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{name} = {value!r}; allowed: an integer >= 1")
        self.alpha = _number("alpha", self.alpha)
        self.check_range("alpha", self.alpha, 0.0, float("inf"), high_open=True)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"method.activation = {self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = list(self.tasks or [])
        # The names are checked against the task registry by the run's config (a layer above), which
        # asks every method for task_names().
        if not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"method.tasks = {self.tasks!r}; allowed: a list of task names")
        if self.tasks:
            if len(set(self.tasks)) != len(self.tasks):
                raise ConfigError(f"method.tasks = {self.tasks} names a task twice")
        if self.keep_ratio is None:
            self.keep_ratio = 0.3 if self.tasks else (0.1 if self.prototype == "lora" else 0.5)
        self.keep_ratio = _number("keep_ratio", self.keep_ratio)
        self.check_range("keep_ratio", self.keep_ratio, 0.0, 1.0)
        self.task_keep_ratio = _number("task_keep_ratio", self.task_keep_ratio)
        self.check_range("task_keep_ratio", self.task_keep_ratio, 0.0, 1.0)
        if self.score_lr is not None:
            self.score_lr = _number("score_lr", self.score_lr)
            self.check_range("score_lr", self.score_lr, 0.0, float("inf"), high_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"method.seed must be an integer, got {self.seed!r}")

    @property
    def mergeable(self) -> bool:
        return self.prototype == "lora"

    # -- structure -------------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> list[tuple[str, nn.Linear]]:
        """``targets`` as given, or for the adapter kind with none given, the FFN output projections."""
        if targets:
            return targets
        for suffix in FFN_OUTPUTS:
            found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, suffix)]
            if found:
                return found
        raise ConfigError("method.target_modules: found no feed-forward output projection "
                          f"({', '.join(FFN_OUTPUTS)}) for the adapter; name this model's one in method.target_modules")

    def group_of(self, name: str) -> str:
        """Which prototype a layer shares: one per target name (lora) or a single one (adapter)."""
        if self.prototype == "adapter":
            return "adapter"
        for t in self.target_modules:
            if matches(name, t):
                # all-linear and re: entries span layers of several kinds: one prototype per kind.
                spans_kinds = t == ALL_LINEAR or t.startswith(REGEX_PREFIX)
                return name.rsplit(".", 1)[-1] if spans_kinds else t.replace(".", "_")
        raise ConfigError(f"module {name} matches none of method.target_modules {self.target_modules}")

    def _groups(self, targets) -> dict[str, list[tuple[str, nn.Linear]]]:
        groups: dict[str, list] = {}
        for name, linear in targets:
            groups.setdefault(self.group_of(name), []).append((name, linear))
        for group, members in groups.items():
            shapes = {tuple(full_shape(m.weight)) for _, m in members}
            if len(shapes) > 1:
                detail = ", ".join(f"{n} {tuple(full_shape(m.weight))}" for n, m in members[:4])
                raise ConfigError(f"method.target_modules: the layers sharing prototype {group!r} differ in shape "
                                  f"({detail}); a prototype is shared only by matrices of one shape")
        return groups

    def _prototype(self, group: str, out_features: int, in_features: int) -> nn.Module:
        # Seeded per group name so every rank and restart builds the same prototype.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(self.seed, f"propetl-prototype:{group}"))
            if self.prototype == "lora":
                return LoRAPrototype(in_features, out_features, self.r)
            return AdapterPrototype(out_features, self.bottleneck)

    def _scores(self, prototype: nn.Module, keep: float, seed_name: str, owner: str,
                packed: dict[str, torch.Tensor] | None) -> ScoreSet:
        for tensor in prototype.masked:
            numel = getattr(prototype, tensor).numel()
            if keep_count(numel, keep) < 1:
                raise ConfigError(f"method.keep_ratio: {keep} of the {numel} entries of the prototype's {tensor} "
                                  f"keeps none in {owner}; raise it")
        gen = None if packed is not None else torch.Generator().manual_seed(name_seed(self.seed, seed_name))
        return ScoreSet(prototype, keep, gen, packed)

    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        targets = self.resolve_targets(model, targets)
        groups = self._groups(targets)
        device = targets[0][1].weight.device
        prototypes = {group: self._prototype(group, *full_shape(members[0][1].weight)).to(device)
                      for group, members in groups.items()}
        shared = ProPETLShared(prototypes, self.tasks)
        for task in self.tasks:
            shared.tasks[task] = nn.ModuleDict({
                group: self._scores(prototypes[group], self.task_keep_ratio, f"propetl-task:{task}:{group}",
                                    f"task {task}", _packed(delta, f"{SHARED_ATTR}.tasks.{task}.{group}", prototypes[group]))
                for group in groups}).to(device)
        setattr(model, SHARED_ATTR, shared)
        for group, members in groups.items():
            proto = prototypes[group]
            for name, linear in members:
                scores = self._scores(proto, self.keep_ratio, name, name, _packed(delta, name, proto)).to(device)
                if self.prototype == "lora":
                    layer = ProPETLLoRALinear(linear, shared, group, scores, self.alpha / self.r)
                else:
                    layer = ProPETLAdapterLinear(linear, shared, group, scores, self.activation)
                replace_module(model, name, layer)

    def after_merge(self, model: nn.Module) -> None:
        if hasattr(model, SHARED_ATTR):
            delattr(model, SHARED_ATTR)

    # -- training --------------------------------------------------------------------------------
    def score_sets(self, model: nn.Module) -> list[ScoreSet]:
        return [m for m in model.modules() if isinstance(m, ScoreSet)]

    def optimizer_groups(self, model: nn.Module, train) -> list[dict]:
        score_ids = {id(p) for s in self.score_sets(model) for p in s.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        rest = [p for p in params if id(p) not in score_ids]
        scores = [p for p in params if id(p) in score_ids]
        lr = self.score_lr if self.score_lr is not None else 10 * train.lr
        return [{"params": rest}, {"params": scores, "lr": lr}]

    def deepspeed_config(self, ds: dict, model: nn.Module) -> dict:
        """Keep the prototype and the scores whole on every rank under ZeRO-3: raise the persistence
        threshold to their largest tensor (they are read by every layer; a few MB in all)."""
        zero = ds.get("zero_optimization", {})
        if int(zero.get("stage", 0)) != 3:
            return ds
        shared = getattr(model, SHARED_ATTR)
        largest = max(full_numel(p) for m in [shared, *self.score_sets(model)] for p in m.parameters())
        if int(zero.get("stage3_param_persistence_threshold", 0)) < largest:
            zero["stage3_param_persistence_threshold"] = largest
        return ds

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def stages(self, train) -> list[Stage]:
        def record_storage(trainer, restoring: bool) -> None:
            if not restoring:  # a resumed run kept the row written before its checkpoint
                trainer.metrics.write({"step": 0, **{f"storage/{k}": v for k, v in self.storage(trainer.model).items()}})

        return [Stage("train", train, before=record_storage)]

    # -- accounting ------------------------------------------------------------------------------
    def storage(self, model: nn.Module) -> dict:
        """Trainable parameters and the Bit-Level Storage of what the compact delta keeps: the
        prototype at 32 bits plus every mask at 1 bit (bit-packed, whole bytes per tensor)."""
        shared: ProPETLShared = getattr(model, SHARED_ATTR)
        proto_numel = sum(full_numel(p) for p in shared.prototypes.parameters())
        score_sets = self.score_sets(model)
        score_numel = sum(full_numel(p) for s in score_sets for p in s.parameters())
        mask_bits = sum(s.mask_bits() for s in score_sets)
        trainable = sum(full_numel(p) for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        base = count_parameters(model) - proto_numel - score_numel
        bits = 32 * proto_numel + mask_bits
        return {"trainable_parameters": trainable, "prototype_parameters": proto_numel,
                "score_parameters": score_numel, "base_parameters": base, "bit_level_storage_bits": bits,
                "prototype_bits": 32 * proto_numel, "mask_bits": mask_bits,
                "bit_level_storage_percent": 100 * bits / (32 * max(base, 1))}

    def describe(self, model: nn.Module) -> str:
        s = self.storage(model)
        shared: ProPETLShared = getattr(model, SHARED_ATTR)
        layers = sum(1 for m in model.modules() if isinstance(m, _ProPETLLayer))
        where = ", ".join(shared.prototypes) if self.prototype == "lora" else "the feed-forward output"
        tasks = f", {len(self.tasks)} task masks (keep {self.task_keep_ratio})" if self.tasks else ""
        return (f"propetl: {self.prototype} prototype on {where} shared by {layers} layers, keep {self.keep_ratio}"
                f"{tasks}; {s['trainable_parameters']:,} trainable parameters ({s['prototype_parameters']:,} prototype "
                f"+ {s['score_parameters']:,} mask scores) = "
                f"{100 * s['trainable_parameters'] / max(s['base_parameters'], 1):.4f}% of the base model's "
                f"{s['base_parameters']:,}; Bit-Level Storage after training {s['bit_level_storage_bits']:,} bits "
                f"({s['prototype_bits']:,} prototype fp32 + {s['mask_bits']:,} mask bits) = "
                f"{s['bit_level_storage_percent']:.4f}% of the base model in fp32")

    # -- compact delta and export ----------------------------------------------------------------
    def model_delta_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        shared: ProPETLShared = getattr(model, SHARED_ATTR)
        out: dict[str, torch.Tensor] = {f"{SHARED_ATTR}.prototypes.{k}": p
                                        for k, p in shared.prototypes.named_parameters()}
        for task, groups in shared.tasks.items():
            for group, scores in groups.items():
                for key, packed in scores.packed().items():
                    out[f"{SHARED_ATTR}.tasks.{task}.{group}.{key}"] = packed
        return out

    def delta_layer_names(self, delta: dict[str, torch.Tensor]) -> set[str]:
        first = f".mask_{'lora_A' if self.prototype == 'lora' else 'down'}"
        return {k[:-len(first)] for k in delta if k.endswith(first) and not k.startswith(SHARED_ATTR + ".")}

    def layer_delta(self, name, delta, shape):
        if self.prototype == "adapter":
            raise ConfigError(
                "ProPETL with method.prototype = adapter cannot be exported as plain Hugging Face weights (the "
                "adapter is a non-linear module after the feed-forward block); use delta.safetensors with "
                "sparse_ft.load_delta(base_model, path) instead")
        if self.tasks:
            raise ConfigError("a multi-task ProPETL delta holds one model per task: pick one first with "
                              "sparse_ft.methods.propetl.task_delta(src, dst, task), then export that")
        group = self.group_of(name)
        tensors = {}
        for t in ("lora_A", "lora_B"):
            proto = delta[f"{SHARED_ATTR}.prototypes.{group}.{t}"].float()
            tensors[t] = proto * unpack_bits(delta[f"{name}.mask_{t}"], proto.shape).to(proto.device)
        return (tensors["lora_B"] @ tensors["lora_A"]) * (self.alpha / self.r)


def _number(name: str, value) -> float:
    """YAML reads 1e-3 as a string; accept it, reject anything else that is not a number."""
    if isinstance(value, bool):
        raise ConfigError(f"method.{name} = {value!r}; allowed: a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"method.{name} = {value!r}; allowed: a number") from None


def _packed(delta: dict | None, prefix: str, prototype: nn.Module) -> dict[str, torch.Tensor] | None:
    """The packed masks under ``prefix`` in a loaded delta (frozen masks), or None when training."""
    if delta is None:
        return None
    out = {}
    for t in prototype.masked:
        key = f"{prefix}.mask_{t}"
        if key not in delta:
            raise ConfigError(f"the delta lacks {key}; it was not written by this ProPETL configuration")
        out[t] = delta[key]
    return out


# -- model-level helpers -------------------------------------------------------------------------
def set_task(model: nn.Module, task: str | int) -> None:
    """Select the task whose mask a multi-task ProPETL model uses from now on (name or index)."""
    shared: ProPETLShared | None = getattr(model, SHARED_ATTR, None)
    if shared is None or not shared.task_names:
        raise ConfigError("set_task: the model has no multi-task ProPETL method applied (method.tasks is empty)")
    if isinstance(task, str):
        if task not in shared.task_names:
            raise ConfigError(f"task {task!r} is not one of this model's tasks {shared.task_names}")
        task = shared.task_names.index(task)
    shared.active_task = int(task)


def task_delta(src, dst, task: str):
    """Write the single-task delta of ``task`` from a multi-task ProPETL delta file: the prototype
    plus each layer's hybrid mask (layer OR task) as its layer mask. Loads and exports like any
    single-task ProPETL delta. Returns ``dst``."""
    tensors, meta = read_delta(src)
    method = dict(meta["method"])
    if method.get("name") != ProPETLConfig.method or not method.get("tasks"):
        raise ConfigError(f"{src} is not a multi-task ProPETL delta")
    if task not in method["tasks"]:
        raise ConfigError(f"task {task!r} is not one of the delta's tasks {method['tasks']}")
    config = ProPETLConfig(**{k: v for k, v in method.items() if k != "name"})
    task_prefix = f"{SHARED_ATTR}.tasks."
    out = {k: v for k, v in tensors.items() if not k.startswith(task_prefix)}
    for key, packed in tensors.items():
        if key.startswith(task_prefix) or ".mask_" not in key or key.startswith(SHARED_ATTR + "."):
            continue
        name, _, tensor = key.rpartition(".mask_")
        group = config.group_of(name)
        proto = tensors[f"{SHARED_ATTR}.prototypes.{group}.{tensor}"]
        layer_mask = unpack_bits(packed, proto.shape)
        task_mask = unpack_bits(tensors[f"{task_prefix}{task}.{group}.mask_{tensor}"], proto.shape)
        out[key] = pack_bits(hybrid_mask(layer_mask, task_mask))
    method["tasks"] = []
    meta_out = {k: v for k, v in meta.items() if k not in ("method", "base_fingerprint", "quantization")}
    meta_out.update(method=json.dumps(method), base_fingerprint=json.dumps(meta["base_fingerprint"]),
                    propetl_task=json.dumps(task))
    if meta.get("quantization") is not None:
        meta_out["quantization"] = json.dumps(meta["quantization"])
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if "tensor_sha256" in meta:  # the checksums of the tensors this file keeps
        meta_out["tensor_sha256"] = json.dumps({k: tensor_sha256(v) for k, v in out.items()})
    save_safetensors(out, dst, meta_out)  # atomic: a failed write keeps what was at dst
    return dst
