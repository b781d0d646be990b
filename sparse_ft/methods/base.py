"""What every method shares: the config base class, target matching and the delta-layer base.

A method is a config dataclass (one per folder, ``config.py``) registered in
:mod:`sparse_ft.methods`; its ``apply_to`` replaces the targeted ``nn.Linear`` modules with layers
built on :class:`DeltaLinear` (``layer.py``). The shared vocabulary, as in PEFT's tuners:

- ``layer.delta_weight()``: the dense update of the layer's weight, for merge and export;
- ``layer.delta_tensors()``: the tensors the compact delta file stores for this layer;
- ``sparse_ft.merge(model)``: folds every delta into its weight and restores plain ``nn.Linear``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.sparse_delta import _linear
from ..quant import base_linear, is_quantized_linear
from ..zero import full_numel, full_shape

logger = logging.getLogger("sparse_ft")


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, module name): stable across processes, restarts and Python runs
    (Python's own ``hash`` of a string is salted per process). Methods seed their per-module
    initialisation and sampling with it, so every rank and restart draws the same."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Stage:
    """One training stage of a method's pipeline (most methods have one).

    ``before(trainer, restoring)`` runs before the stage's engine is built: it may prune, re-wrap
    layers or fold weights. With ``restoring=True`` the run is resuming at or after this stage and the
    previous stage's training was skipped, so ``before`` must rebuild its result from what it saved
    in ``trainer.output_dir`` rather than recompute it.
    """

    name: str
    train: Any
    """The stage's :class:`sparse_ft.config.TrainConfig` (rates, steps, batch)."""
    before: Callable[[Any, bool], None] | None = None


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses set ``method`` and validate in ``__post_init__``."""

    method: ClassVar[str] = ""

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """The ``nn.Linear`` modules to adapt. Each entry is a name suffix, matched against the last
    parts of each module's dotted name (``q_proj`` matches ``model.layers.3.self_attn.q_proj``;
    ``self_attn.q_proj`` works too); ``re:<pattern>``, a regular expression the whole dotted name
    must match (``re:.*layers[.][0-3][.].*_proj``); or ``all-linear``, every ``nn.Linear`` but the
    output head. The log lists what matched."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"method.target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        for t in self.target_modules:
            check_target(t)

    # -- hooks a method implements -------------------------------------------------------------
    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]],
                 delta: dict[str, torch.Tensor] | None = None) -> None:
        """Replace each ``(name, linear)`` in ``targets`` with this method's layer, in place.

        ``delta`` (keys ``<module name>.<tensor name>``, as :meth:`DeltaLinear.delta_tensors` names
        them) supplies fixed structure such as sparse indices, when loading a saved delta; the
        trained values are copied in afterwards by the caller."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> str:
        """One line for the log: what was trained, counted the ways the method's paper counts."""
        n_train = sum(full_numel(p) for _, p in trainable_named(model))
        total = count_parameters(model)
        return f"{self.method}: {n_train:,} trainable parameters ({100 * n_train / max(total, 1):.4f}% of {total:,})"

    def model_delta_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors held at model level (not in a layer) that the compact delta stores, keyed by
        their full name. Full fine-tuning stores every parameter; ProPETL its shared prototype."""
        return {}

    def stages(self, train) -> list[Stage]:
        """The training pipeline; ``train`` is the run's TrainConfig, passed in by the trainer (methods
        never import the run's config). A stage with its own settings derives them with
        ``train.override(values, where)``, which checks and coerces them. One stage by default."""
        return [Stage("train", train)]

    def task_names(self) -> list[str]:
        """Task registry names this method trains on besides the run's task (multi-task ProPETL);
        the run's config checks they exist. None by default."""
        return []

    def optimizer_groups(self, model: nn.Module, train) -> list[dict]:
        """AdamW parameter groups; methods with their own rates (ProPETL's scores) override this."""
        return [{"params": [p for _, p in trainable_named(model)]}]

    def deepspeed_config(self, ds: dict, model: nn.Module) -> dict:
        """The DeepSpeed config a stage's engine is built with, after the method is applied; methods
        adjust it here (ProPETL keeps its shared prototype whole on every rank under ZeRO-3)."""
        return ds

    @property
    def mergeable(self) -> bool:
        """Whether the trained model is the base plus per-layer weight updates, which merge and the
        HF export can fold in. ProPETL's adapter kind (a non-linear module) is not: its export is
        the compact delta plus a loader."""
        return True

    # -- offline export (no model is built: the base checkpoint streams shard by shard) ------------
    def layer_delta(self, name: str, delta: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Dense fp32 update of the base weight of layer ``name``, from the compact delta's tensors
        (keys ``<name>.<tensor>``; model-level ones too). Must equal the layer's ``delta_weight()``."""
        raise NotImplementedError(f"{self.method} does not implement offline export")

    def delta_layer_names(self, delta: dict[str, torch.Tensor]) -> set[str]:
        """Module names that carry a layer delta in ``delta``."""
        return {key.rsplit(".", 1)[0] for key in delta if "." in key}

    def export_tensor(self, key: str, tensor: torch.Tensor, delta: dict[str, torch.Tensor],
                      layers: set[str]) -> torch.Tensor:
        """The exported value of base tensor ``key`` (the model's module name plus ``.weight`` or
        ``.bias``), given as stored in the base checkpoint. Return it unchanged, or a new tensor
        computed in fp32. Default: ``W + layer_delta`` for weights of adapted layers. Methods that
        also change other tensors (DSEE's pruning) override this."""
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and name in layers:
            # A copy: the reader's tensor may be memory-mapped from the base checkpoint.
            merged = tensor.to(torch.float32, copy=True)
            self.add_layer_delta_(name, delta, merged)
            return merged
        return tensor

    def export_touches(self, key: str, delta: dict[str, torch.Tensor], layers: set[str]) -> bool:
        """Whether :meth:`export_tensor` may change base tensor ``key``; export copies the others
        as the base's bytes without reading them. A method that overrides ``export_tensor`` must
        override this too: until it does, every tensor counts as touched (correct, only slower)."""
        if type(self).export_tensor is not MethodConfig.export_tensor:
            return True
        name, _, leaf = key.rpartition(".")
        return leaf == "weight" and name in layers

    def add_layer_delta_(self, name: str, delta: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """``weight += layer_delta`` in place (fp32). Methods with a cheaper form (a sparse
        scatter) override this instead of building the dense delta."""
        weight += self.layer_delta(name, delta, tuple(weight.shape)).to(weight.device)

    def after_merge(self, model: nn.Module) -> None:
        """Remove model-level state the method added (shared prototypes, pruning masks...)."""

    def check_quantized(self, quantization: str) -> None:
        """Raise ``ConfigError`` if this method cannot train on a base quantized as ``quantization``
        (``nf4``/``int8``): called before any model is loaded. Methods whose update lives in the
        activations or in a transiently dequantized weight work; ones that write the base do not."""

    # -- shared helpers ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.method, **dataclasses.asdict(self)}

    def check_range(self, field_name: str, value: float, low: float, high: float,
                    low_open: bool = True, high_open: bool = False) -> None:
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (isinstance(value, (int, float)) and ok_low and ok_high):
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise ConfigError(f"method.{field_name} = {value!r} is out of range; allowed: {lo}{low}, {high}{hi}")


class DeltaLinear(nn.Module):
    """A linear layer that owns a frozen base weight (the very ``Parameter`` of the ``nn.Linear``
    it replaces, so ZeRO-3 partitioning and checkpoint names are kept) plus a trainable delta.

    The base weight keeps its original name (``...q_proj.weight``) so a state dict of the wrapped
    model still lines up with the base checkpoint.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        # A bitsandbytes layer (quantized base) is kept, unregistered (its weight and bias are the ones
        # registered here), for its kernels and int8 matmul state; see :meth:`base_forward`.
        # A stage's layer built over the previous stage's (LoReML) inherits its quantized base.
        quantized_base = base if is_quantized_linear(base) else getattr(base, "quantized_base", None)
        object.__setattr__(self, "quantized_base", quantized_base)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def quantized(self) -> bool:
        """Whether the frozen base weight is bitsandbytes-quantized (packed; read by dequantizing)."""
        return self.quantized_base is not None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` with the frozen base weight, plain or quantized, in ``x``'s dtype."""
        if self.quantized_base is not None:
            return base_linear(self.quantized_base, x, self.weight, self.bias, self.training)
        return _linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``dW`` (out x in, fp32) such that merged weight = ``W + dW``."""
        raise NotImplementedError

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of this layer that the compact delta stores (trained ones and fixed indices)."""
        raise NotImplementedError

    def folded_into_weight(self, flat_positions: torch.Tensor) -> torch.Tensor | None:
        """fp32 entries, at ``flat_positions`` of the weight, of an update the method added to the base
        weight in place (LoReML stage 2 folds ``alpha2 U V`` in), so the delta's base fingerprint
        describes the untouched base. None: the weight is the base weight."""
        return None

    def method_parameters(self) -> list[nn.Parameter]:
        """Parameters that must be gathered (under ZeRO-3) to compute ``delta_weight``."""
        return [p for n, p in self.named_parameters(recurse=True) if n not in ("weight", "bias")]

    def extra_repr(self) -> str:
        shape = tuple(full_shape(self.weight))
        return f"in_features={self.in_features}, out_features={self.out_features}, base_shape={shape}"


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> int:
    """All parameters of the model, counted at their full (unpartitioned) size, shared ones once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += full_numel(p)
    return total


ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"


def check_target(target: str, field_name: str = "method.target_modules") -> None:
    """A ``re:`` entry must compile."""
    if target.startswith(REGEX_PREFIX):
        try:
            re.compile(target[len(REGEX_PREFIX):])
        except re.error as e:
            raise ConfigError(f"{field_name}: {target!r} is not a valid regular expression ({e}); allowed: a name "
                              "suffix, re:<pattern> or all-linear") from None


def matches(name: str, target: str) -> bool:
    """Whether module ``name`` is selected by one ``target_modules`` entry (``all-linear`` matches
    every name here; :func:`find_targets` then keeps Linear layers and leaves out the head)."""
    if target == ALL_LINEAR:
        return True
    if target.startswith(REGEX_PREFIX):
        return re.fullmatch(target[len(REGEX_PREFIX):], name) is not None
    return name == target or name.endswith("." + target)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) computing the output logits (``lm_head``), which ``all-linear`` skips."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("lm_head", "embed_out")}


def summarize_names(names: list[str]) -> str:
    """``model.layers.*.self_attn.q_proj x30, ...``: layer indices folded, counted."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.\d+(?=\.|$)", ".*", n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{c}" if c > 1 else k for k, c in counts.items())


def find_targets(model: nn.Module, target_modules: list[str], field_name: str = "method.target_modules"
                 ) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose names end with one of ``target_modules``.

    Raises ``ConfigError`` naming each target that matched nothing and listing what could match.
    """
    found: list[tuple[str, nn.Linear]] = []
    hit = {t: 0 for t in target_modules}
    wrong_type: dict[str, str] = {}
    heads = output_head_names(model) if ALL_LINEAR in target_modules else set()
    for name, module in model.named_modules():
        for t in target_modules:
            if t == ALL_LINEAR and (name in heads or not isinstance(module, (nn.Linear, DeltaLinear))):
                continue
            if matches(name, t):
                if isinstance(module, DeltaLinear):
                    raise ConfigError(f"{field_name}: module {name} is already adapted by sparse-ft; "
                                      "apply a method once, or merge first")
                if not isinstance(module, nn.Linear):
                    wrong_type[name] = type(module).__name__
                    continue
                found.append((name, module))
                hit[t] += 1
                break
    missing = [t for t, count in hit.items() if count == 0]
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        extra = ""
        if wrong_type:
            sample = ", ".join(f"{n} ({t})" for n, t in list(wrong_type.items())[:3])
            extra = f"; matching modules that are not nn.Linear: {sample}"
        raise ConfigError(f"{field_name}: {missing} matched no nn.Linear module of this model; "
                          f"its Linear layers are named: {', '.join(linear_names)}{extra}")
    logger.info("%s matched %d layers: %s", field_name, len(found), summarize_names([n for n, _ in found]))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
