"""DSEE (Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
Models", paper 004): each target matrix learns ``dW = s (B A + P_Omega(S))`` -- a LoRA-style
low-rank update plus a few sparse entries at positions Omega found by a robust PCA (GreBsmo) of
the pretrained weight -- and, optionally, the model is then pruned guided by ``|dW|`` and trained
again to recover ("dually sparse": sparse updates and a sparse final model).

Pipeline (:meth:`DSEEConfig.stages`): stage ``finetune`` trains A, B, S; with ``prune`` set, stage
``recover`` first prunes (unstructured by ``|dW|`` / ``|W|``, or attention heads by ``|dW|``),
then trains A, B, S again with the pruning enforced. Paper settings: q and v, r = 16, |Omega| = 16,
AdamW, the same learning rate before and after pruning (2e-4 .. 1e-3 on BERT), 50-80% of the
parameters kept (unstructured) or 3-9 heads of 12 removed per layer (structured).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...delta_file import save_safetensors
from ...errors import ConfigError
from ...zero import dist_info, full_numel
from ..base import MethodConfig, Stage, count_parameters, name_seed, replace_module
from .layer import DSEELinear, compose_delta
from .omega import RPCASettings, _broadcast_from_rank0, omega_for_model
from . import prune as P

logger = logging.getLogger("sparse_ft")

PRUNE_KINDS = ("none", "unstructured", "structured")
PRUNING_FILE = "dsee_pruning.safetensors"


def _optional_number(field_name: str, value, kind=float):
    """YAML reads ``1e-3`` as a string; numbers stay numbers, None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"method.{field_name} = {value!r}; allowed: a number or null")
    try:
        out = kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"method.{field_name} = {value!r}; allowed: a number or null") from None
    if kind is int and float(value) != out:
        raise ConfigError(f"method.{field_name} = {value!r}; allowed: an integer or null")
    return out


@dataclass
class DSEEConfig(MethodConfig):
    method: ClassVar[str] = "dsee"

    r: int = 16
    """Rank of the low-rank part ``B A`` (paper: 16, or 8 at half the parameters)."""

    alpha: float = 32.0
    """Scale numerator: ``dW = (alpha / r) (B A + P_Omega(S))``."""

    n_sparse: int = 16
    """|Omega|: sparse trainable entries per target matrix, at the positions of the largest
    ``|S|`` of the RPCA of the pretrained weight (paper: 16; 8-256 studied)."""

    init_std: float = 0.02
    """Standard deviation of A's Gaussian initialisation (paper: N(0, 0.02)); B and S start at 0."""

    seed: int = 0
    """Seed of A's initialisation and of GreBsmo's random sketches, per (seed, module name): the
    same on every rank and restart."""

    rpca_rank: int = 32
    """GreBsmo: cap on the rank of the low-rank part the sparse residual is measured against."""

    rpca_tau: float = 3.0
    """GreBsmo: hard threshold of the sparse part, in units of ``std(W)`` (LLaMA/OPT weights are not
    BERT-scaled, so an absolute threshold would not carry over between models)."""

    rpca_steps: int = 10
    """GreBsmo: most outer steps (each adds ``rpca_dr`` to the rank)."""

    rpca_inner: int = 2
    """GreBsmo: alternating updates of U, V, S per outer step."""

    rpca_dr: int = 4
    """GreBsmo: rank added per outer step, from a random sketch of the residual."""

    rpca_tol: float = 1e-3
    """GreBsmo: stop when a step lowers the relative error by less than this fraction."""

    omega_file: str | None = None
    """A file written by ``sparse-ft rpca`` to take Omega from instead of decomposing at start-up
    (checked against the base weights' fingerprint)."""

    omega_cache_dir: str | None = None
    """Where computed Omegas are cached, keyed by base-weight fingerprint and settings; default
    ``$SPARSE_FT_CACHE/omega`` (``~/.cache/sparse_ft/omega``)."""

    prune: str = "none"
    """``none`` (one stage), ``unstructured`` or ``structured``: prune after the first stage, then
    train the recovery stage."""

    prune_ratio: float = 0.3
    """unstructured: fraction of the adapted matrices' entries zeroed, those with the smallest
    ``|dW|`` (one threshold over all adapted matrices), in [0, 1)."""

    prune_ratio_other: float | None = None
    """unstructured: fraction of the other linear layers' entries zeroed, smallest ``|W|`` first (one
    threshold over all of them); default: ``prune_ratio``. 0 leaves them dense."""

    prune_heads: int = 0
    """structured: attention heads removed per layer (lowest ``|dW_q| + |dW_v|`` over their rows)."""

    prune_exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    """Linear modules never pruned (the output head by default)."""

    recovery_epochs: float | None = None
    """Epochs of the recovery stage; default: ``train.epochs``."""

    recovery_max_steps: int | None = None
    """Optimizer steps of the recovery stage; default: ``train.max_steps``."""

    recovery_lr: float | None = None
    """Learning rate of the recovery stage; default: ``train.lr`` (the paper uses the same rate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "n_sparse", "rpca_rank", "rpca_steps", "rpca_inner", "rpca_dr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{name} = {value!r}; allowed: an integer >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"method.seed must be an integer, got {self.seed!r}")
        self.check_range("alpha", self.alpha, 0.0, float("inf"), high_open=True)
        self.check_range("init_std", self.init_std, 0.0, float("inf"), high_open=True)
        self.check_range("rpca_tau", self.rpca_tau, 0.0, float("inf"), low_open=False, high_open=True)
        self.check_range("rpca_tol", self.rpca_tol, 0.0, 1.0, low_open=False, high_open=True)
        if self.prune not in PRUNE_KINDS:
            raise ConfigError(f"method.prune = {self.prune!r}; allowed: {', '.join(PRUNE_KINDS)}")
        self.prune_ratio = _optional_number("prune_ratio", self.prune_ratio)
        self.check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, low_open=False, high_open=True)
        self.prune_ratio_other = _optional_number("prune_ratio_other", self.prune_ratio_other)
        if self.prune_ratio_other is not None:
            self.check_range("prune_ratio_other", self.prune_ratio_other, 0.0, 1.0, low_open=False, high_open=True)
        if isinstance(self.prune_heads, bool) or not isinstance(self.prune_heads, int) or self.prune_heads < 0:
            raise ConfigError(f"method.prune_heads = {self.prune_heads!r}; allowed: an integer >= 0")
        if self.prune == "structured" and self.prune_heads < 1:
            raise ConfigError("method.prune = structured needs method.prune_heads >= 1 (heads removed per layer)")
        if isinstance(self.prune_exclude, str):
            self.prune_exclude = [self.prune_exclude]
        if not isinstance(self.prune_exclude, (list, tuple)) or not all(isinstance(e, str) for e in self.prune_exclude):
            raise ConfigError(f"method.prune_exclude must be a list of module names, got {self.prune_exclude!r}")
        self.prune_exclude = list(self.prune_exclude)
        self.recovery_epochs = _optional_number("recovery_epochs", self.recovery_epochs)
        if self.recovery_epochs is not None and self.recovery_epochs <= 0:
            raise ConfigError(f"method.recovery_epochs = {self.recovery_epochs}; allowed: > 0 or null")
        self.recovery_max_steps = _optional_number("recovery_max_steps", self.recovery_max_steps, int)
        self.recovery_lr = _optional_number("recovery_lr", self.recovery_lr)
        if self.recovery_lr is not None and self.recovery_lr <= 0:
            raise ConfigError(f"method.recovery_lr = {self.recovery_lr}; allowed: > 0 or null")
        if self.omega_file is not None and not Path(self.omega_file).expanduser().is_file():
            raise ConfigError(f"method.omega_file: {self.omega_file} does not exist; write it with "
                              "'sparse-ft rpca --model M --out FILE'")

    # -- building the layers ---------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def rpca_settings(self) -> RPCASettings:
        return RPCASettings(n_sparse=self.n_sparse, rank_cap=self.rpca_rank, tau=self.rpca_tau, steps=self.rpca_steps,
                            inner=self.rpca_inner, dr=self.rpca_dr, tol=self.rpca_tol, seed=self.seed)

    def init_A(self, name: str, in_features: int) -> torch.Tensor:
        # A CPU generator per module name: the same A on every rank and restart, in any order.
        gen = torch.Generator(device="cpu").manual_seed(name_seed(self.seed, name))
        return torch.randn(self.r, in_features, generator=gen) * self.init_std

    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        if delta is not None:
            for name, linear in targets:
                A = delta[f"{name}.lora_A"]
                replace_module(model, name, DSEELinear(linear, delta[f"{name}.indices"], A.shape[0], self.alpha,
                                                       torch.zeros(A.shape)))
            state = P.split_state(delta)
            if state:
                P.apply_pruning(model, state)
            return
        names = [n for n, _ in targets]
        omega = omega_for_model(model, names, self.rpca_settings(), self.omega_file, self.omega_cache_dir)
        for name, linear in targets:
            replace_module(model, name, DSEELinear(linear, omega[name], self.r, self.alpha,
                                                   self.init_A(name, linear.in_features)))

    def check_quantized(self, quantization: str) -> None:
        if self.prune != "none":
            raise ConfigError(f"method.prune = {self.prune} with model.quantization = {quantization}: DSEE's pruning "
                              "zeroes entries of the base weights, which a quantized base stores as packed integers; "
                              "allowed on a quantized base: method.prune=none")

    def describe(self, model: nn.Module) -> str:
        layers = [m for m in model.modules() if isinstance(m, DSEELinear)]
        k = sum(layer.indices.numel() for layer in layers)
        low_rank = sum(full_numel(layer.lora_A) + full_numel(layer.lora_B) for layer in layers)
        total = count_parameters(model) - k - low_rank
        return (f"dsee: {low_rank + k:,} trainable = {low_rank:,} low-rank (r={self.r}) + {k:,} sparse (|Omega|="
                f"{self.n_sparse} per matrix) on {len(layers)} matrices ({', '.join(self.target_modules)}); "
                f"{100 * (low_rank + k) / max(total, 1):.4f}% of {total:,}; prune={self.prune}")

    # -- the pipeline ------------------------------------------------------------------------------
    def stages(self, train) -> list[Stage]:
        if self.prune == "none":
            return [Stage("train", train)]
        recover = dataclasses.replace(
            train,
            epochs=self.recovery_epochs if self.recovery_epochs is not None else train.epochs,
            max_steps=self.recovery_max_steps if self.recovery_max_steps is not None else train.max_steps,
            lr=self.recovery_lr if self.recovery_lr is not None else train.lr)
        return [Stage("finetune", train), Stage("recover", recover, before=self.prune_stage)]

    def compute_pruning(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The pruning state for ``model`` as trained so far (collective)."""
        if self.prune == "unstructured":
            other = self.prune_ratio if self.prune_ratio_other is None else self.prune_ratio_other
            return P.compute_unstructured(model, self.prune_ratio, other, self.prune_exclude)
        if self.prune == "structured":
            return P.compute_structured(model, self.prune_heads)
        raise ConfigError("method.prune = none: nothing to prune")

    def prune_stage(self, trainer, restoring: bool) -> None:
        """Stage ``recover``'s ``before``: prune (saving the result to the output dir), or, when the
        run resumes in or after it, re-apply the pruning saved when stage 1 ended."""
        path = Path(trainer.output_dir) / PRUNING_FILE
        if restoring:
            state = read_pruning_file(path)
            P.apply_pruning(trainer.model, state)
            logger.info("DSEE pruning restored from %s", path)
            return
        state = self.compute_pruning(trainer.model)
        counts = P.apply_pruning(trainer.model, state)
        summary = P.summarize(trainer.model, counts, trainer.run_config.task.max_length, self.prune)
        if trainer.rank == 0:
            write_pruning_file(path, state, summary)
        trainer.metrics.write({"stage": "recover", "step": 0, **summary})
        logger.info("DSEE pruning (%s): %s", self.prune, ", ".join(
            f"{k.split('/')[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('/')[1]}={v}" for k, v in summary.items()))

    # -- compact delta and export ------------------------------------------------------------------
    def model_delta_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(P.pruning_state(model) or {})

    def after_merge(self, model: nn.Module) -> None:
        for attr in (P.STATE_ATTR, P.BASE_FINGERPRINT_ATTR):
            if hasattr(model, attr):
                object.__delattr__(model, attr)

    def delta_layer_names(self, delta: dict[str, torch.Tensor]) -> set[str]:
        adapted = {k[:-len(".lora_A")] for k in delta if k.endswith(".lora_A")}
        return adapted | set(P.state_modules(delta))

    def layer_delta(self, name, delta, shape):
        entry = P.state_modules(delta).get(name, {})
        keep_rows = keep_cols = None
        m, n = shape
        if "rows" in entry:
            keep_rows = torch.ones(m)
            keep_rows[entry["rows"].to(torch.int64)] = 0
        if "cols" in entry:
            keep_cols = torch.ones(n)
            keep_cols[entry["cols"].to(torch.int64)] = 0
        A = delta[f"{name}.lora_A"]
        return compose_delta(A, delta[f"{name}.lora_B"], delta[f"{name}.indices"], delta[f"{name}.values"],
                             self.alpha / A.shape[0], shape, keep_rows, keep_cols, entry.get("keep_bits"))

    def export_touches(self, key, delta, layers):
        # The cases in which export_tensor below returns something other than its input.
        name, _, leaf = key.rpartition(".")
        entries = P.state_modules(delta)
        entry = entries.get(name) or entries.get(f"model.{name}")
        if leaf == "weight":
            return f"{name}.lora_A" in delta or bool(entry)
        return leaf == "bias" and bool(entry) and "rows" in entry

    def export_tensor(self, key, tensor, delta, layers):
        name, _, leaf = key.rpartition(".")
        entries = P.state_modules(delta)
        # Checkpoints of some models omit the base-model prefix for tensors the exporter did not map.
        entry = entries.get(name) or entries.get(f"model.{name}")
        if leaf == "weight":
            out = tensor
            if f"{name}.lora_A" in delta:
                out = tensor.float() + self.layer_delta(name, delta, tuple(tensor.shape)).to(tensor.device)
            if entry:
                keep = P.keep_mask_dense(entry, tensor, delta.get(f"{P.PREFIX}other_threshold"))
                out = out.masked_fill(~keep.to(out.device), 0)
            return out
        if leaf == "bias" and entry and "rows" in entry:
            out = tensor.clone()
            out[entry["rows"].to(torch.int64)] = 0
            return out
        return tensor


def write_pruning_file(path: Path, state: dict[str, torch.Tensor], summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, {"summary": json.dumps(summary)})


def read_pruning_file(path: Path) -> dict[str, torch.Tensor]:
    """Rank 0 reads ``path`` and broadcasts it (the output dir need not be shared between nodes)."""
    rank, world = dist_info()
    state = None
    if rank == 0:
        if path.is_file():
            from safetensors.torch import load_file

            state = load_file(str(path))
    if world > 1:
        state = _broadcast_from_rank0(state)
    if state is None:
        raise ConfigError(f"train.resume_from: the run resumes in DSEE's recovery stage, which needs the pruning "
                          f"saved when stage 1 ended ({path}); it is missing")
    return state
