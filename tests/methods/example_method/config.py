"""The row-delta method's config: its fields are the YAML ``method:`` keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sparse_ft.errors import ConfigError
from sparse_ft.methods.base import MethodConfig, replace_module

from .layer import RowDeltaLinear


@dataclass
class RowDeltaConfig(MethodConfig):
    method: ClassVar[str] = "row_delta"
    """The ``method.name`` this config is registered under."""

    row: int = 0
    """Which output row of each target matrix trains (>= 0, below the matrix's row count)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.row, int) or self.row < 0:
            raise ConfigError(f"method.row = {self.row!r}; allowed: an integer >= 0")

    def apply_to(self, model: nn.Module, targets: list[tuple[str, nn.Linear]], delta=None) -> None:
        for name, linear in targets:
            if self.row >= linear.out_features:
                raise ConfigError(f"method.row = {self.row} but {name} has {linear.out_features} rows")
            replace_module(model, name, RowDeltaLinear(linear, self.row))

    def layer_delta(self, name: str, delta: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The same update as ``RowDeltaLinear.delta_weight``, from the delta file alone (offline export)."""
        dw = torch.zeros(shape)
        dw[self.row] = delta[f"{name}.values"].float()
        return dw
