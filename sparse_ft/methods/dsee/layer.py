"""The DSEE layer: ``y = x (W + dW)^T + b`` with ``dW = s (B A + P_Omega(S))``, ``s = alpha / r``.

The sparse part is the Random Masking layer's (:class:`SparseDeltaLinear`, values at the fixed
positions ``indices`` = Omega, through the sparse-delta op that keeps no merged weight), with its
values scaled by ``s``; the low-rank part is a LoRA branch ``s x A^T B^T``.

After DSEE's pruning the layer also enforces a keep mask on its delta (the pruned entries of ``W``
are zeroed in place by :mod:`.prune`), so that ``W + dW`` stays zero where ``W`` was pruned:

- structured pruning removes whole rows (q, k, v) or columns (o): the low-rank branch's output
  (or input) is multiplied by a 0/1 vector, which costs nothing;
- unstructured pruning is elementwise, which makes the masked update dense: the layer then builds
  the merged weight ``W + M * dW`` transiently and adds a dense ``dy^T x`` in backward (the cost of
  a dense weight gradient, for the adapted matrices only, in the recovery stage only; see
  :class:`MaskedDeltaFn`). The mask is held bit-packed (``m n / 8`` bytes) and unpacked on the
  fly; autograd saves only ``x``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...ops.sparse_delta import _linear
from ...zero import full_shape
from ..random_mask.layer import SparseDeltaLinear

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 of ``ceil(numel / 8)`` bytes, little-endian bit order within a byte."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` entries."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


def bits_at(packed: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """The bits of ``packed`` at ``flat_index`` (bool), without unpacking the whole mask."""
    idx = flat_index.to(torch.int64)
    return ((packed[idx >> 3] >> (idx & 7).to(torch.uint8)) & 1).bool()


def compose_delta(A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float,
                  shape, keep_rows: torch.Tensor | None = None, keep_cols: torch.Tensor | None = None,
                  keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """Dense fp32 ``dW = s (B A + P_Omega(values))``, zero where a keep mask says pruned.

    The one formula behind the layer's ``delta_weight`` and the offline export."""
    m, n = shape
    dense = B.detach().float() @ A.detach().float()
    dense.view(-1).index_add_(0, indices.to(dense.device, torch.int64), values.detach().float().to(dense.device))
    dense.mul_(scale)
    if keep_rows is not None:
        dense.mul_(keep_rows.to(dense.device, torch.float32).view(m, 1))
    if keep_cols is not None:
        dense.mul_(keep_cols.to(dense.device, torch.float32).view(1, n))
    if keep_bits is not None:
        dense.masked_fill_(~unpack_bits(keep_bits.to(dense.device), m * n).view(m, n), 0.0)
    return dense


def _masked_merged_weight(weight, A, B, values, indices, keep_bits, scale, dtype):
    """``W + M * s (B A + P_Omega(values))`` as a new dense tensor in ``dtype`` (fp32 inside)."""
    m, n = B.shape[0], A.shape[1]
    delta = B.detach().float() @ A.detach().float()
    delta.view(-1).index_add_(0, indices.to(torch.int64), values.detach().float())
    delta.mul_(scale).masked_fill_(~unpack_bits(keep_bits, m * n).view(m, n), 0.0)
    return delta.add_(weight.float()).to(dtype)


class MaskedDeltaFn(torch.autograd.Function):
    """``y = x (W + M * s (B A + P_Omega(values)))^T + b`` for an elementwise 0/1 mask ``M`` held
    bit-packed: DSEE's adapted layer after unstructured pruning.

    The mask makes the update dense, so the merged weight is built (transiently, in forward and
    again in backward; autograd saves only ``x`` and references) and used in one matmul each for
    ``y`` and ``dx``; ``G = dy^T x`` (the cost of a dense weight gradient) masked by ``M`` gives
    ``dA = s B^T G``, ``dB = s G A^T`` and ``dvalues = s G[Omega]``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, values, indices, keep_bits, scale):
        ctx.save_for_backward(x, weight, A, B, values, indices, keep_bits)
        ctx.scale = scale
        w = _masked_merged_weight(weight, A, B, values, indices, keep_bits, scale, x.dtype)
        return _linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, values, indices, keep_bits = ctx.saved_tensors
        scale = ctx.scale
        m, n = B.shape[0], A.shape[1]
        dy2 = dy.reshape(-1, m)
        dx = dA = dB = dv = None
        if ctx.needs_input_grad[0]:
            w = _masked_merged_weight(weight, A, B, values, indices, keep_bits, scale, dy2.dtype)
            dx = (dy2 @ w).view(*dy.shape[:-1], n)
        if any(ctx.needs_input_grad[3:6]):
            # dy^T x in the activations' dtype (fp32 accumulation on tensor cores), then fp32.
            g = (dy2.t() @ x.reshape(-1, n).to(dy2.dtype)).float()
            g.masked_fill_(~unpack_bits(keep_bits, m * n).view(m, n), 0.0)
            if ctx.needs_input_grad[3]:
                dA = (B.detach().float().t() @ g).mul_(scale).to(A.dtype)
            if ctx.needs_input_grad[4]:
                dB = (g @ A.detach().float().t()).mul_(scale).to(B.dtype)
            if ctx.needs_input_grad[5]:
                dv = g.view(-1).index_select(0, indices.to(torch.int64)).mul_(scale).to(values.dtype)
        return dx, None, None, dA, dB, dv, None, None, None


class DSEELinear(SparseDeltaLinear):
    """``y = x (W + s (B A + P_Omega(values)))^T + b``. Trainable: ``lora_A`` (r x in, given at
    construction, DSEE draws it from N(0, 0.02)), ``lora_B`` (out x r, zero) and ``values``
    (|Omega|, zero), so a fresh layer computes exactly the base layer.

    Pruning state (set by :func:`sparse_ft.methods.dsee.prune.apply_pruning`, non-persistent
    buffers, rebuilt from the pruning file on resume): ``keep_rows`` (out) or ``keep_cols`` (in) as
    0/1 vectors, or ``keep_bits`` (bit-packed out x in mask); ``values_keep`` is the mask at Omega.
    """

    def __init__(self, base: nn.Linear, indices: torch.Tensor, r: int, alpha: float, lora_A: torch.Tensor):
        super().__init__(base, indices)
        device = self.indices.device
        if tuple(lora_A.shape) != (r, self.in_features):
            raise ValueError(f"lora_A must be {r} x {self.in_features}, got {tuple(lora_A.shape)}")
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        self.lora_A = nn.Parameter(lora_A.detach().to(device=device, dtype=torch.float32).clone())
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        for name in ("keep_rows", "keep_cols", "keep_bits", "values_keep"):
            self.register_buffer(name, None, persistent=False)

    # -- pruning ---------------------------------------------------------------------------------
    @property
    def pruned(self) -> bool:
        return self.keep_rows is not None or self.keep_cols is not None or self.keep_bits is not None

    def set_keep(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 bits: torch.Tensor | None = None) -> None:
        """Install the keep mask (exactly one of ``rows``, ``cols`` (0/1 vectors) or ``bits``)."""
        device = self.indices.device
        idx = self.indices.to(torch.int64)
        if rows is not None:
            self.keep_rows = rows.to(device=device, dtype=torch.float32)
            self.values_keep = self.keep_rows[idx // self.in_features]
        elif cols is not None:
            self.keep_cols = cols.to(device=device, dtype=torch.float32)
            self.values_keep = self.keep_cols[idx % self.in_features]
        elif bits is not None:
            self.keep_bits = bits.to(device=device, dtype=torch.uint8)
            self.values_keep = bits_at(self.keep_bits, idx).float()
        else:
            raise ValueError("set_keep needs rows, cols or bits")

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_bits is not None:
            return MaskedDeltaFn.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.values, self.indices,
                                       self.keep_bits, self.scale)
        values = self.values * self.scale
        if self.values_keep is not None:
            values = values * self.values_keep
        y = self.sparse_forward(x, values)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = x if self.keep_cols is None else x * self.keep_cols.to(x.dtype)
        z = (h @ a.t()) @ b.t()
        if self.keep_rows is not None:
            z = z * self.keep_rows.to(x.dtype)
        return y + z * self.scale

    # -- the shared vocabulary -------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return compose_delta(self.lora_A, self.lora_B, self.indices, self.values, self.scale, full_shape(self.weight),
                             self.keep_rows, self.keep_cols, self.keep_bits)

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values, "lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        pruned = ", pruned" if self.pruned else ""
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}{pruned}"
