"""LoReML: low-rank mask learning, then masked fine-tuning (paper 000, its appendix).

Stage 1 trains a low-rank update ``(alpha / r) U V`` on each target matrix (LoRA). The mask of each
matrix is then the top ``rho`` of ``|U V|``. Stage 2 folds ``alpha2 U V`` into the base weight
(``alpha2`` may be 0: stage 1 then only chose the mask) and trains sparse values on the mask with
the Random Masking module. One config runs both stages, each with its own training settings
(``stage1``/``stage2``: the appendix's tables give batch size, epochs and learning rate per stage).

Between the stages ``loreml_stage1.safetensors`` (U, V and the mask of every matrix) is written to
``train.output_dir``: a resumed stage 2 re-folds from it (checkpoints hold only what trains), and
``stage1_result`` reruns stage 2 alone from it.

Appendix values: GLUE on RoBERTa-base r 3, alpha 6 (3 for some tasks), stage-2 alpha 0-6, AdamW,
warm-up ratio 0.06, linear schedule; LLaMA-7B r 16, alpha = r, stage-2 alpha 8 (XSum) or 16
(OpenBookQA), stage-1/2 learning rates 5e-5/1e-4, batch 16/32.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from torch import nn

from ...delta_file import save_safetensors
from ...errors import ConfigError
from ...zero import full_numel, gathered
from ..base import MethodConfig, Stage, count_parameters, name_seed, replace_module
from ..fingerprint import check_fingerprint, fingerprint
from ..lora.layer import LoRALinear
from ..random_mask.layer import SparseDeltaLinear
from .layer import FoldedSparseDeltaLinear, fold_into_weight, low_rank, mask_indices

logger = logging.getLogger("sparse_ft")

STAGE1_FILE = "loreml_stage1.safetensors"
STAGE1_FORMAT = "sparse-ft-loreml-stage1/1"


@dataclass
class LoReMLConfig(MethodConfig):
    method: ClassVar[str] = "loreml"

    r: int = 16
    """Stage 1: rank of U V (appendix: 16 for LLaMA-7B/13B and OPT-6.7B, 3-4 for RoBERTa)."""

    alpha: float = 16.0
    """Stage 1: the update trained is ``(alpha / r) U V`` (appendix: alpha = r for the LLMs)."""

    rho: float = 0.005
    """Keep ratio of the mask, in (0, 1]: stage 2 trains the ``round(rho * m * n)`` entries of each
    target matrix with the largest ``|U V|`` (0.5% keeps about LoRA r=16's parameter count on 7B)."""

    alpha2: float = 0.0
    """Stage 2: ``W <- W + alpha2 U V`` before the sparse values train, >= 0. 0 keeps the base weights
    (stage 1 then only chose the mask); ``alpha / r`` keeps exactly what stage 1 learned. Appendix:
    0-8 on GLUE, 8 (XSum) or 16 (OpenBookQA) on LLaMA-7B."""

    stage1: dict = field(default_factory=dict)
    """Training settings of stage 1 that differ from the ``train`` section, e.g. ``{lr: 5e-5,
    epochs: 5, micro_batch_size: 16}``. Any ``train`` key except the run-wide ones (output_dir,
    checkpoint_dir, resume_from, overwrite_output_dir, save_delta, precision, keep_last, eval_before)."""

    stage2: dict = field(default_factory=dict)
    """Training settings of stage 2 that differ from the ``train`` section (as ``stage1``); the
    sparse values usually want a larger rate than U V (Random Masking: 1e-3 to 1e-1)."""

    stage1_result: str | None = None
    """A ``loreml_stage1.safetensors`` from an earlier run: skip stage 1 and run stage 2 on its U V
    (the mask is recomputed if ``rho`` differs from the one it was saved with)."""

    seed: int = 0
    """Seed of the initialisation of V (U starts at zero), per module name."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"method.r = {self.r!r}; allowed: an integer >= 1")
        for name, low_open in (("alpha", True), ("alpha2", False), ("rho", True)):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"method.{name} = {value!r}; allowed: a number") from None
            setattr(self, name, value)
        self.check_range("alpha", self.alpha, 0.0, float("inf"), high_open=True)
        self.check_range("alpha2", self.alpha2, 0.0, float("inf"), low_open=False, high_open=True)
        self.check_range("rho", self.rho, 0.0, 1.0)
        # Only the shape here: the keys and values are checked against the train section by
        # train.override() when stages() derives each stage's settings (the config does so before
        # any model loads).
        for which in ("stage1", "stage2"):
            values = getattr(self, which)
            if values is None:
                setattr(self, which, {})
            elif not isinstance(values, dict):
                raise ConfigError(f"method.{which} = {values!r}; allowed: a mapping of train keys, e.g. "
                                  "{lr: 1e-4, epochs: 5}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"method.seed must be an integer, got {self.seed!r}")

    # -- structure -------------------------------------------------------------------------------
    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        if delta is not None:
            stage2 = all(f"{name}.indices" in delta for name, _ in targets)
            if stage2:  # a stage-2 delta: fold its U V into the base, sparse layers on its mask
                self.to_stage2(model, {name: (delta[f"{name}.fold_U"], delta[f"{name}.fold_V"],
                                              delta[f"{name}.indices"]) for name, _ in targets}, targets)
                return
        elif self.stage1_result is not None:  # stage 2 alone, from an earlier run's stage 1
            path = Path(self.stage1_result)
            if not path.is_file():
                raise ConfigError(f"method.stage1_result = {self.stage1_result!r} is not a file; allowed: a "
                                  f"{STAGE1_FILE} written by an earlier LoReML run")
            self.to_stage2(model, self.read_stage1(path, model), targets)
            return
        for name, linear in targets:
            # V (lora_A) kaiming, U (lora_B) zero, seeded per module name (any rank, any order).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(name_seed(self.seed, name))
                replace_module(model, name, LoRALinear(linear, self.r, self.alpha))

    def to_stage2(self, model: nn.Module, result: dict[str, tuple], targets=None) -> None:
        """Fold ``alpha2 U V`` into each target weight and put a sparse layer on its mask.
        ``result``: module name -> (U, V, indices). Collective under ZeRO-3."""
        modules = dict(model.named_modules())
        names = [n for n, _ in targets] if targets is not None else list(result)
        missing = [n for n in names if n not in result]
        if missing:
            raise ConfigError(f"the LoReML stage-1 result has no U V for {missing[:3]}; it was written for other "
                              "method.target_modules")
        for name in names:
            U, V, indices = result[name]
            layer = modules[name]
            fold_into_weight(layer.weight, U, V, self.alpha2)
            replace_module(model, name, FoldedSparseDeltaLinear(layer, indices, U, V, self.alpha2))

    # -- the stage boundary ----------------------------------------------------------------------
    def stages(self, train) -> list[Stage]:
        s1 = train.override(self.stage1, "method.stage1")
        s2 = train.override(self.stage2, "method.stage2")
        if self.stage1_result is not None:
            return [Stage("stage2", s2)]
        return [Stage("stage1", s1), Stage("stage2", s2, before=self._enter_stage2)]

    def _enter_stage2(self, trainer, restoring: bool) -> None:
        path = Path(trainer.output_dir) / STAGE1_FILE
        if restoring:
            # Checkpoints hold only trained tensors: the base was reloaded unfolded, re-fold it.
            if not path.is_file():
                raise ConfigError(f"resuming LoReML stage 2 needs {path}, written at the end of stage 1; it is missing")
            result = self.read_stage1(path, trainer.model)
        else:
            result = self.stage1_result_of(trainer.model)
            self.write_stage1(path, result, trainer.model, write=trainer.rank == 0)
        self.to_stage2(trainer.model, result)
        logger.info(self.describe(trainer.model))

    def stage1_result_of(self, model: nn.Module) -> dict[str, tuple]:
        """name -> (U, V, indices) from the trained stage-1 layers, fp32 on CPU. Collective under ZeRO-3."""
        out = {}
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                with gathered([layer.lora_A, layer.lora_B]):
                    U = layer.lora_B.detach().to("cpu", torch.float32).clone()
                    V = layer.lora_A.detach().to("cpu", torch.float32).clone()
                out[name] = (U, V, mask_indices(U, V, self.rho))
        if not out:
            raise ConfigError("LoReML stage 2 found no stage-1 layers in the model")
        return out

    def write_stage1(self, path: Path, result: dict[str, tuple], model: nn.Module, write: bool) -> None:
        """Save U, V and the mask of every matrix, with the base fingerprint (rank 0 writes)."""
        fp = fingerprint(model, list(result))
        if write:
            tensors = {}
            for name, (U, V, indices) in result.items():
                tensors.update({f"{name}.U": U, f"{name}.V": V, f"{name}.indices": indices})
            meta = {"format": STAGE1_FORMAT, "method": json.dumps(self.to_dict()), "rho": repr(self.rho),
                    "base_fingerprint": json.dumps(fp)}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, path, meta)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def read_stage1(self, path: Path, model: nn.Module) -> dict[str, tuple]:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STAGE1_FORMAT:
                raise ConfigError(f"{path} is not a LoReML stage-1 result (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        check_fingerprint(json.loads(meta["base_fingerprint"]), model)
        same_rho = float(meta["rho"]) == self.rho
        if not same_rho:
            logger.info("LoReML: %s was saved with rho %s; recomputing the masks for method.rho = %s",
                        path, meta["rho"], self.rho)
        out = {}
        for key in tensors:
            if key.endswith(".U"):
                name = key[:-2]
                U, V = tensors[f"{name}.U"], tensors[f"{name}.V"]
                out[name] = (U, V, tensors[f"{name}.indices"] if same_rho else mask_indices(U, V, self.rho))
        return out

    # -- accounting ------------------------------------------------------------------------------
    def describe(self, model: nn.Module) -> str:
        sparse = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
        lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
        layers = sparse or lora
        covered = sum(full_numel(m.weight) for m in layers)
        targets = ", ".join(self.target_modules)
        if sparse:
            k = sum(m.indices.numel() for m in sparse)
            total = count_parameters(model) - k
            return (f"loreml stage 2: {k:,} trainable values on the learned masks = {100 * k / covered:.4f}% of the "
                    f"{len(sparse)} targeted matrices ({targets}) = {100 * k / total:.4f}% of all {total:,} "
                    f"parameters; alpha2 = {self.alpha2:g} times U V folded into the weights")
        n = sum(full_numel(m.lora_A) + full_numel(m.lora_B) for m in lora)
        total = count_parameters(model) - n
        k = sum(max(1, round(self.rho * full_numel(m.weight))) for m in lora)
        return (f"loreml stage 1: rank-{self.r} U V on {len(lora)} matrices ({targets}): {n:,} trainable parameters "
                f"= {100 * n / total:.4f}% of all {total:,}; stage 2 will train {k:,} values (rho = {self.rho:g} "
                f"of each matrix)")

    # -- export ----------------------------------------------------------------------------------
    def layer_delta(self, name, delta, shape):
        if f"{name}.indices" in delta:  # stage 2: what was folded in plus the sparse values
            dense = SparseDeltaLinear.dense_delta(delta[f"{name}.indices"], delta[f"{name}.values"].float(), shape)
            if self.alpha2:
                dense = dense + self.alpha2 * low_rank(delta[f"{name}.fold_U"], delta[f"{name}.fold_V"]).to(dense.device)
            return dense
        # stage 1 (a checkpoint taken before the stage boundary): the low-rank update itself
        return (self.alpha / self.r) * low_rank(delta[f"{name}.lora_B"], delta[f"{name}.lora_A"])
