"""LoReML's pieces: the mask from a low-rank update, the fold ``W <- W + alpha2 U V`` and the stage-2
layer (the Random Masking module with learned indices, which remembers what was folded in).

Stage 1 reuses :class:`sparse_ft.methods.lora.LoRALinear` (``U`` is its ``lora_B``, ``V`` its
``lora_A``). Stage 2 reuses :class:`sparse_ft.methods.random_mask.SparseDeltaLinear`.
"""
from __future__ import annotations

import torch
from torch import nn

from ...quant import weight_kind
from ...zero import full_shape, gathered
from ..random_mask.layer import SparseDeltaLinear, index_dtype


def low_rank(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``U V`` in fp32 on the CPU. Every code path (mask, fold, export) uses this one product, so a
    resumed run folds bit-for-bit what an uninterrupted one folded."""
    return U.detach().to("cpu", torch.float32) @ V.detach().to("cpu", torch.float32)


def mask_indices(U: torch.Tensor, V: torch.Tensor, rho: float) -> torch.Tensor:
    """Sorted flat positions of the ``round(rho * m * n)`` largest ``|U V|`` (at least one).

    Computed on the CPU from identical inputs, so every rank gets the same mask without a
    broadcast."""
    uv = low_rank(U, V).abs().reshape(-1)
    k = max(1, int(round(rho * uv.numel())))
    idx = torch.topk(uv, k, sorted=False).indices
    return idx.sort().values.to(index_dtype(uv.numel()))


@torch.no_grad()
def fold_into_weight(weight: nn.Parameter, U: torch.Tensor, V: torch.Tensor, alpha2: float) -> None:
    """``W <- W + alpha2 U V`` in place (in W's dtype). Collective under ZeRO-3: call on every rank."""
    if alpha2 == 0 or weight_kind(weight) is not None:
        # A quantized base cannot take the fold: FoldedSparseDeltaLinear adds it to its transiently
        # dequantized weight instead.
        return
    update = alpha2 * low_rank(U, V)
    with gathered([weight], modifier_rank=0):
        w = weight.data
        w.copy_((w.float() + update.to(w.device)).to(w.dtype))


class FoldedSparseDeltaLinear(SparseDeltaLinear):
    """LoReML stage 2: ``y = x (W' + scatter(values))^T + b`` with ``W' = W + alpha2 U V`` already
    folded into the base weight, and ``indices`` the top rho of ``|U V|``. On a quantized base the
    weight is left as loaded and the fold is added to the transiently dequantized copy instead.

    ``fold_U`` (out x r) and ``fold_V`` (r x in) are kept as non-persistent buffers (not in
    checkpoints) so the compact delta can carry them: export writes ``W + alpha2 U V + S`` from
    the untouched base, and the base fingerprint is taken with the fold subtracted.
    """

    def __init__(self, base: nn.Module, indices: torch.Tensor, U: torch.Tensor, V: torch.Tensor, alpha2: float):
        super().__init__(base, indices)
        device = self.weight.device
        self.register_buffer("fold_U", U.detach().to(device, torch.float32).clone(), persistent=False)
        self.register_buffer("fold_V", V.detach().to(device, torch.float32).clone(), persistent=False)
        self.alpha2 = float(alpha2)

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().delta_tensors(), "fold_U": self.fold_U, "fold_V": self.fold_V}

    def quantized_fold(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return (self.fold_U, self.fold_V, self.alpha2) if self.alpha2 else None

    def folded_into_weight(self, flat_positions: torch.Tensor) -> torch.Tensor | None:
        if self.alpha2 == 0 or self.quantized:  # a quantized weight was left as loaded
            return None
        n = full_shape(self.weight)[1]
        rows, cols = flat_positions // n, flat_positions % n
        U, V = self.fold_U.float().cpu(), self.fold_V.float().cpu()
        return self.alpha2 * (U[rows.cpu()] * V[:, cols.cpu()].t()).sum(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded alpha2={self.alpha2:g} rank={self.fold_U.shape[1]}"
