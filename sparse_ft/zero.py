"""Small helpers for code that must work both on plain modules and under DeepSpeed ZeRO-3.

Under ZeRO-3 a partitioned parameter has ``shape == [0]``; its real shape is ``ds_shape`` and
its element count ``ds_numel``. Code that needs a shape must ask through these helpers.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """True when ``param`` is managed by ZeRO-3 (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")


def _packed_4bit_shape(param: torch.Tensor) -> torch.Size | None:
    """The logical (out, in) shape of a bitsandbytes 4-bit weight, whose own shape is that of its
    packed bytes; None for any other tensor."""
    if type(param).__name__ == "Params4bit" and getattr(param, "quant_state", None) is not None:
        return torch.Size(param.quant_state.shape)
    return None


def full_shape(param: torch.Tensor) -> torch.Size:
    packed = _packed_4bit_shape(param)
    if packed is not None:
        return packed
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    packed = _packed_4bit_shape(param)
    if packed is not None:
        return packed.numel()
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned ``params`` for the duration of the block; a no-op otherwise.

    With ``modifier_rank`` set, changes made on that rank are scattered back on exit.
    """
    params = [p for p in params if p is not None and is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed  # only reached under ZeRO-3 (partitioned parameters); it takes seconds to import

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def dist_info() -> tuple[int, int]:
    """(rank, world_size), or (0, 1) when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
