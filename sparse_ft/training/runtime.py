"""Process-level setup: distributed init (launcher or plain process), precision, devices, memory."""
from __future__ import annotations

import datetime
import os
import resource
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Works under deepspeed/torchrun/SLURM launchers, which set the
    usual env variables, and as one plain process, for which it sets them. ``timeout_s`` bounds every
    collective (``train.dist_timeout_s``; torch's default when None)."""
    import deepspeed  # a dependency, imported where used: it takes seconds to import

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if os.environ.get("WORLD_SIZE") == "1":
            # One process rendezvouses with itself: any free port does. Never trust an inherited
            # MASTER_PORT here; a parent that ran this function (a sweep, a notebook, pytest) holds it.
            os.environ["MASTER_PORT"] = str(_free_port())
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(verbose=False, **kwargs)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return rank, world, local_rank


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 on a GPU that supports it, fp32 on other GPUs; on CPU whichever this machine
    multiplies faster (measured once and cached, see :mod:`sparse_ft.ops.cpu_precision`). Under
    several processes rank 0 decides for all, so every rank runs the same precision."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from ..ops.cpu_precision import cpu_precision

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        choice = [cpu_precision() if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(choice, src=0)
        return choice[0]
    return cpu_precision()


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch on this rank, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor
