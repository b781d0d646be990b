"""Row delta: each target matrix trains one of its rows, ``dW[row, :] = v`` (v starts at zero)."""
from __future__ import annotations

import torch
from torch import nn

from sparse_ft.methods.base import DeltaLinear


class RowDeltaLinear(DeltaLinear):
    """``y = x W^T + b``, plus ``x v`` added to output feature ``row``."""

    def __init__(self, base: nn.Linear, row: int):
        super().__init__(base)  # keeps the base weight Parameter (names, ZeRO-3 partitions) and freezes it
        self.row = row
        self.values = nn.Parameter(torch.zeros(self.in_features, device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        extra = torch.zeros(self.out_features, dtype=x.dtype, device=x.device)
        extra[self.row] = 1
        return y + (x @ self.values.to(x.dtype)).unsqueeze(-1) * extra

    def delta_weight(self) -> torch.Tensor:
        """The dense update, for merge: zeros but row ``row``."""
        dw = torch.zeros(self.out_features, self.in_features, device=self.values.device)
        dw[self.row] = self.values.detach().float()
        return dw

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """What the compact delta file stores for this layer."""
        return {"values": self.values}
