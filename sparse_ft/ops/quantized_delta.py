"""``y = x (deq(Wq) + F + S)^T + b`` for a bitsandbytes-quantized frozen weight ``Wq``.

The unquantized op (:mod:`.sparse_delta`) writes ``W[idx] + v`` into ``W`` and restores it; packed
4-bit or int8 bytes cannot hold ``W[idx] + v``. Here one layer's weight is dequantized transiently
(what bitsandbytes' own 4-bit matmul does for any batch larger than one token), the k values are
added to that copy, one dense matmul runs, and the copy is freed. Backward dequantizes again for
``dx``; autograd keeps only ``x`` and references, never a dense weight.

``F`` is an optional low-rank term ``alpha2 U V`` (LoReML stage 2 on a quantized base: the fold
cannot be written into packed weights either, so it is added to the transient copy).

Why not the delta's product on the activations (``y += scatter(x[:, cols] * v)``)? On a quantized
base both paths must produce the frozen matmul anyway, and bitsandbytes dequantizes for it; adding
k entries to that copy costs O(k), while the activation path costs O(tokens x k) in time and a
(tokens x k) intermediate per layer in forward and again in backward. ``scripts/bench_quantized.py
--section op`` measures both (docs/quantized.md).
"""
from __future__ import annotations

import torch

from ..quant import dequantize
from .sparse_delta import _linear, sampled_weight_grad


def effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype,
                     fold: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """``deq(Wq) [+ alpha2 U V] + scatter(values)`` as a new dense tensor in ``dtype`` (the sum in fp32
    where a fold is present, else in ``dtype``)."""
    if fold is not None:
        U, V, alpha2 = fold
        w = dequantize(weight, torch.float32)
        w.addmm_(U.float(), V.float(), alpha=alpha2)
        w = w.to(dtype)
    else:
        w = dequantize(weight, dtype)
    w.view(-1).index_add_(0, indices, values.detach().to(dtype))
    return w


class QuantizedSparseDeltaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, rows, cols, fold_U, fold_V, alpha2):
        ctx.save_for_backward(x, values, indices, rows, cols, fold_U, fold_V)
        # The quantized parameter itself (its quant_state / SCB ride on the object), not a saved copy.
        ctx.weight, ctx.alpha2 = weight, alpha2
        fold = None if fold_U is None else (fold_U, fold_V, alpha2)
        w = effective_weight(weight, values, indices, x.dtype, fold)
        return _linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, values, indices, rows, cols, fold_U, fold_V = ctx.saved_tensors
        dx = dvalues = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[0]:
            fold = None if fold_U is None else (fold_U, fold_V, ctx.alpha2)
            w = effective_weight(ctx.weight, values, indices, dy2.dtype, fold)
            dx = torch.mm(dy2, w).view(*dy.shape[:-1], w.shape[1])
            del w
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            rows_cols = None if rows is None else (rows, cols)
            dvalues = sampled_weight_grad(dy2, x2, indices, x2.shape[1], rows_cols=rows_cols).to(values.dtype)
        return dx, None, None, dvalues, None, None, None, None, None, None


def quantized_sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None = None,
                                  cols: torch.Tensor | None = None,
                                  fold: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """``F.linear(x, deq(Wq) [+ alpha2 U V] + scatter(values), bias)`` with gradients for ``x`` and
    ``values`` only. ``weight`` is a bitsandbytes ``Params4bit`` or ``Int8Params``."""
    U, V, alpha2 = fold if fold is not None else (None, None, 0.0)
    return QuantizedSparseDeltaFn.apply(x, weight, bias, values, indices, rows, cols, U, V, alpha2)
