"""Random Masking (Xu & Zhang, "Random Masking Finds Winning Tickets for Parameter Efficient
Fine-tuning", paper 002): train a fixed random subset of each target weight's entries.

Learning-rate advice from the paper (its Figure 3, Tables 6-7): the sparser the mask, the larger the
best rate, up to 1e-1 at 0.001% of all parameters; a rate that suits LoRA (1e-4) leaves a sparse
mask near zero-shot. Constant schedule, AdamW, batch 8, 5 epochs in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...errors import ConfigError
from ...zero import full_numel, full_shape
from ..base import MethodConfig, count_parameters, replace_module
from .layer import SparseDeltaLinear, sample_indices

DENSITY_OF = ("matrix", "model")


@dataclass
class RandomMaskConfig(MethodConfig):
    method: ClassVar[str] = "random_mask"

    density: float = 1e-3
    """Fraction of entries trained, in (0, 1]. Read per target matrix, or as a fraction of all the
    model's parameters when ``density_of`` is ``model`` (the paper's convention)."""

    density_of: str = "matrix"
    """``matrix``: each target matrix trains ``round(density * rows * cols)`` entries. ``model``: the
    total trained count is ``density`` times all parameters of the model, spread over the target
    matrices in proportion to their size (paper 002: 0.1%, 0.01%, 0.001% of all parameters on q, v)."""

    seed: int = 0
    """Seed of the masks. Each matrix's positions come from a generator seeded by (seed, module
    name): identical on every rank and restart."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.density_of not in DENSITY_OF:
            raise ConfigError(f"method.density_of = {self.density_of!r}; allowed: {', '.join(DENSITY_OF)}")
        self.check_range("density", self.density, 0.0, 1.0)
        if not isinstance(self.seed, int):
            raise ConfigError(f"method.seed must be an integer, got {self.seed!r}")

    def matrix_density(self, model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> float:
        """Density applied to each target matrix (converts the ``model`` convention)."""
        if self.density_of == "matrix":
            return self.density
        target_numel = sum(full_numel(m.weight) for _, m in targets)
        per_matrix = self.density * count_parameters(model) / target_numel
        if per_matrix > 1:
            raise ConfigError(
                f"method.density = {self.density} of all parameters needs {per_matrix:.3g} of the targeted "
                f"matrices ({', '.join(self.target_modules)}), more than all of them; lower method.density "
                "or target more modules")
        return per_matrix

    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        if delta is not None:
            for name, linear in targets:
                replace_module(model, name, SparseDeltaLinear(linear, delta[f"{name}.indices"]))
            return
        per_matrix = self.matrix_density(model, targets)
        for name, linear in targets:
            m, n = full_shape(linear.weight)
            k = round(per_matrix * m * n)
            if k < 1:
                raise ConfigError(f"method.density = {self.density} leaves no trainable entry in {name} "
                                  f"({m}x{n}); raise method.density")
            indices = sample_indices(m * n, k, self.seed, name)
            replace_module(model, name, SparseDeltaLinear(linear, indices))

    def layer_delta(self, name, delta, shape):
        return SparseDeltaLinear.dense_delta(delta[f"{name}.indices"], delta[f"{name}.values"], shape)

    def add_layer_delta_(self, name, delta, weight):
        # Same result as adding the dense delta, without building it: export time is disk time
        # plus this, for every adapted matrix of the model.
        weight.view(-1).index_add_(0, delta[f"{name}.indices"].long(), delta[f"{name}.values"].float())

    def describe(self, model: nn.Module) -> str:
        layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
        k = sum(layer.indices.numel() for layer in layers)
        covered = sum(full_numel(layer.weight) for layer in layers)
        total = count_parameters(model) - k  # the base model's own parameters
        return (f"random_mask: {k:,} trainable values = {100 * k / total:.4f}% of all {total:,} parameters "
                f"= {100 * k / covered:.4f}% of the {len(layers)} targeted matrices ({', '.join(self.target_modules)}); "
                f"density given per {self.density_of}")
