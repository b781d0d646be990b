"""LoRA (Hu et al. 2021), the baseline every paper compares against: ``dW = (alpha / r) B A``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import DeltaLinear


class LoRALinear(DeltaLinear):
    """``y = x W^T + b + scale * dropout(x) A^T B^T``; A is (r x in), B is (out x r), B starts at 0."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 init: str = "kaiming", dtype: torch.dtype = torch.float32):
        super().__init__(base)
        device = self.weight.device
        self.r = r
        self.scale = alpha / r
        # Initialised on the CPU generator (seeded by the caller), then moved: same on every device.
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=0.02)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; allowed: kaiming, gaussian")
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return (self.dropout(x) @ a.t() @ b.t()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x) + self.lora_out(x)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"
