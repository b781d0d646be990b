"""``y = x (W + S)^T + b`` where ``S`` is a sparse delta stored as (flat indices, values).

The frozen weight ``W`` is never copied. Forward and backward temporarily write ``W[idx] + v``
into the k delta positions of ``W`` itself, run the dense matmul, and write the saved original
entries back, so the restore is exact in any dtype and autograd never holds a merged weight.
Autograd saves only ``x`` and references to ``W``/``v``/``idx`` (ZeRO-3 re-gathers ``W`` and
``v`` before this module's backward, exactly as it does for ``nn.Linear``).

The values' gradient is ``(dy^T x)[idx]``. Two ways to get it:

- ``dense``: the full ``dy^T x`` product followed by a gather (cost of a dense weight gradient);
- ``sampled``: only the k dot products (SDDMM): Triton kernels on CUDA (``triton``: token-chunked,
  ``triton_xt``: over a transposed x; see :mod:`sparse_ft.ops.sddmm_triton`), a chunked gather in
  torch elsewhere.

Which is faster depends on the density, shape and device; :mod:`sparse_ft.ops.crossover` decides.
"""
from __future__ import annotations

import torch

from . import crossover

# The real aten op: DeepSpeed's zero.Init monkeypatches torch.nn.functional.linear.
_linear = torch._C._nn.linear


def merge_sparse_delta(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``W + scatter(values)`` as a new tensor; ``weight`` is left untouched."""
    flat = torch.index_add(weight.reshape(-1), 0, indices, values.to(weight.dtype))
    return flat.view(weight.shape)


class _DeltaInPlace:
    """Context that writes ``W[idx] + v`` into ``W`` and restores the original entries on exit.

    Works on ``weight.data`` so autograd's version counter of the parameter is not bumped (the
    parameter is frozen and nothing else reads it while the context is open).
    """

    def __init__(self, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
        self.flat = weight.data.view(-1)
        self.values = values
        self.indices = indices

    def __enter__(self) -> None:
        if self.flat.is_cuda and crossover.triton_available(self.flat.device):
            # triton is optional (CUDA only): imported only on that path
            from .sddmm_triton import delta_write

            self.saved = delta_write(self.flat, self.indices, self.values)
            return
        self.saved = self.flat.index_select(0, self.indices)
        self.flat.index_put_((self.indices,), self.saved + self.values.to(self.flat.dtype))

    def __exit__(self, *exc) -> None:
        if self.flat.is_cuda and crossover.triton_available(self.flat.device):
            # triton is optional (CUDA only): imported only on that path
            from .sddmm_triton import delta_restore

            delta_restore(self.flat, self.indices, self.saved)
            return
        self.flat.index_put_((self.indices,), self.saved)


def _with_delta(weight, values, indices, fn):
    """Run ``fn(W_eff)`` where ``W_eff = W + scatter(values)``, without copying ``W`` if possible."""
    if weight.is_contiguous():
        with _DeltaInPlace(weight, values, indices):
            return fn(weight.data)
    return fn(merge_sparse_delta(weight, values, indices))


def sampled_weight_grad(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, in_features: int,
                        backend: str | None = None,
                        rows_cols: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(dy^T x).flatten()[indices]`` for 2-D ``dy`` (T x m) and ``x`` (T x n), accumulated in fp32.

    Returns fp32 of length ``len(indices)``. ``backend`` forces ``dense``, ``sampled`` (torch
    gather) or ``triton``; ``None`` lets the crossover table decide. ``rows_cols`` are the
    indices' (row, column) pairs as int32, when the caller keeps them (saves two launches).
    """
    m = dy.shape[1]
    if backend is None:
        backend = crossover.choose(m, in_features, dy.shape[0], indices.numel(), dy.dtype, dy.device,
                                   grad_fn=sampled_weight_grad)
    if backend == "dense":
        full = torch.mm(dy.t(), x.to(dy.dtype))
        return full.view(-1).index_select(0, indices).float()
    if rows_cols is None:
        rows = torch.div(indices, in_features, rounding_mode="floor")
        rows_cols = (rows, indices - rows * in_features)
    rows, cols = rows_cols
    if backend in ("triton", "triton_xt"):
        from .sddmm_triton import sddmm  # triton is optional (CUDA only)

        return sddmm(dy, x, rows.int(), cols.int(), layout="tchunk" if backend == "triton" else "xt")
    if backend == "sampled":
        return _sddmm_torch(dy, x, rows, cols)
    raise ValueError(f"unknown SDDMM backend {backend!r}; allowed: dense, sampled, triton, triton_xt")


def _sddmm_torch(dy, x, rows, cols, chunk_elems: int = 1 << 24):
    """Plain-torch SDDMM: gather the needed columns of dy and x in chunks of nonzeros."""
    T = dy.shape[0]
    k = rows.numel()
    step = max(1, chunk_elems // max(T, 1))
    out = torch.empty(k, dtype=torch.float32, device=dy.device)
    for s in range(0, k, step):
        a = dy.index_select(1, rows[s:s + step]).float()
        b = x.index_select(1, cols[s:s + step]).float()
        out[s:s + step] = (a * b).sum(0)
    return out


class SparseDeltaLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, rows=None, cols=None):
        ctx.save_for_backward(x, weight, values, indices, rows, cols)
        ctx.has_bias = bias is not None
        w_dtype = x.dtype
        return _with_delta(weight, values, indices,
                           lambda w: _linear(x, w.to(w_dtype), None if bias is None else bias.to(w_dtype)))

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, indices, rows, cols = ctx.saved_tensors
        dx = dvalues = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = _with_delta(weight, values, indices, lambda w: torch.mm(dy2, w.to(dy2.dtype)))
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            rows_cols = None if rows is None else (rows, cols)
            dvalues = sampled_weight_grad(dy2, x2, indices, x2.shape[1], rows_cols=rows_cols).to(values.dtype)
        return dx, None, None, dvalues, None, None, None


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None = None,
                        cols: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W + scatter(values), bias)`` with gradients for ``x`` and ``values`` only.

    ``rows``/``cols`` (int32, the indices' row and column) may be passed to save recomputing them
    in every backward."""
    return SparseDeltaLinearFn.apply(x, weight, bias, values, indices, rows, cols)
