"""LoRA baseline (paper 002 uses r = 8, alpha = 16 on q and v)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import ConfigError
from ..base import MethodConfig, name_seed, replace_module
from .layer import LoRALinear


@dataclass
class LoRAConfig(MethodConfig):
    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update B A."""

    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) B A."""

    dropout: float = 0.0
    """Dropout on the LoRA branch's input, in [0, 1)."""

    seed: int = 0
    """Seed for the initialisation of A (B starts at zero)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"method.r = {self.r!r}; allowed: an integer >= 1")
        self.check_range("alpha", self.alpha, 0.0, float("inf"), high_open=True)
        self.check_range("dropout", self.dropout, 0.0, 1.0, low_open=False, high_open=True)

    def layer_delta(self, name, delta, shape):
        a, b = delta[f"{name}.lora_A"].float(), delta[f"{name}.lora_B"].float()
        return (b @ a) * (self.alpha / self.r)

    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        for name, linear in targets:
            # Seed per module name so the init does not depend on construction order or rank.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(name_seed(self.seed, name))
                replace_module(model, name, LoRALinear(linear, self.r, self.alpha, self.dropout))
