"""The sparse-delta linear layer (Random Masking, LoReML stage 2, DSEE's sparse part) and the
seeded index sampler.

The delta of a weight W (m x n) is k trainable values at fixed flat positions ``indices`` (sorted,
int32 unless m*n needs int64). The forward is ``F.linear(x, W + scatter(values))`` computed by
:func:`sparse_ft.ops.sparse_delta_linear`, which keeps no merged weight alive.
"""
from __future__ import annotations

import torch
from torch import nn

from ...ops import quantized_sparse_delta_linear, sparse_delta_linear
from ...zero import full_shape
from ..base import DeltaLinear, name_seed  # noqa: F401  (name_seed: also importable from here)


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def sample_indices(numel: int, k: int, seed: int, name: str) -> torch.Tensor:
    """Exactly ``k`` distinct flat positions in ``[0, numel)``, uniformly at random, sorted.

    Drawn on a CPU generator seeded by ``name_seed(seed, name)``, so every rank and every restart
    gets the same positions, whatever order modules are built in. For small ``k`` this draws with
    replacement until ``k`` distinct positions exist and keeps a random ``k`` of them (a uniform
    subset, without the ``numel``-sized permutation); for large ``k`` it takes a permutation prefix.
    """
    if not 0 < k <= numel:
        raise ValueError(f"k={k} must be in [1, {numel}]")
    gen = torch.Generator(device="cpu").manual_seed(name_seed(seed, name))
    if k * 8 > numel:
        picked = torch.randperm(numel, generator=gen)[:k]
    else:
        distinct = torch.empty(0, dtype=torch.int64)
        while distinct.numel() < k:
            draw = torch.randint(0, numel, (2 * (k - distinct.numel()) + 16,), generator=gen)
            distinct = torch.unique(torch.cat([distinct, draw]))
        picked = distinct[torch.randperm(distinct.numel(), generator=gen)[:k]]
    return picked.sort().values.to(index_dtype(numel))


class SparseDeltaLinear(DeltaLinear):
    """``y = x (W + scatter(scale * values, indices))^T + b`` with trainable ``values`` only.

    ``indices`` is a buffer (never communicated by ZeRO, saved once in the delta); ``values`` is a
    zero-initialised ``nn.Parameter`` of the same length.
    """

    def __init__(self, base: nn.Linear, indices: torch.Tensor, values_dtype: torch.dtype = torch.float32):
        super().__init__(base)
        m, n = full_shape(self.weight)
        if indices.dim() != 1 or indices.numel() == 0:
            raise ValueError("indices must be a non-empty 1-D tensor")
        device = self.weight.device
        self.register_buffer("indices", indices.to(device=device, dtype=index_dtype(m * n)))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype, device=device))
        # (row, column) of each index for the SDDMM, kept so backward does not recompute them;
        # not saved (derived from indices).
        idx = self.indices.long()
        self.register_buffer("rows", torch.div(idx, n, rounding_mode="floor").int(), persistent=False)
        self.register_buffer("cols", (idx % n).int(), persistent=False)

    @property
    def density(self) -> float:
        m, n = full_shape(self.weight)
        return self.indices.numel() / (m * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse_forward(x, self.values)

    def sparse_forward(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``x (W + scatter(values))^T + b``; on a quantized base through a transiently dequantized
        weight (:mod:`sparse_ft.ops.quantized_delta`)."""
        if self.quantized:
            return quantized_sparse_delta_linear(x, self.weight, self.bias, values, self.indices, self.rows,
                                                 self.cols, self.quantized_fold())
        return sparse_delta_linear(x, self.weight, self.bias, values, self.indices, self.rows, self.cols)

    def quantized_fold(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """A low-rank ``(U, V, alpha)`` the quantized path adds to the dequantized weight (the fold a
        plain base takes in place); None here."""
        return None

    @staticmethod
    def dense_delta(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
        """fp32 (m x n) matrix holding ``values`` at the flat ``indices``, zero elsewhere."""
        m, n = shape
        dense = torch.zeros(m * n, dtype=torch.float32, device=values.device)
        dense.index_add_(0, indices.to(values.device), values.detach().float())
        return dense.view(m, n)

    def delta_weight(self) -> torch.Tensor:
        return self.dense_delta(self.indices, self.values, full_shape(self.weight))

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.indices.numel()}, density={self.density:.3g}"
