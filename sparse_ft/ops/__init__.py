"""Kernels and autograd functions shared by the methods."""
from .quantized_delta import quantized_sparse_delta_linear
from .sparse_delta import sparse_delta_linear, sampled_weight_grad, merge_sparse_delta

__all__ = ["sparse_delta_linear", "sampled_weight_grad", "merge_sparse_delta", "quantized_sparse_delta_linear"]
