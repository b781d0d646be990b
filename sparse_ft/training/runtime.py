"""Process-level setup: distributed init (launcher or plain process), precision, devices, memory."""
from __future__ import annotations

import datetime
import os
import resource
import socket
import time
from pathlib import Path

import torch

from ..errors import RunError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extension_roots() -> list[Path]:
    """Where torch builds JIT extensions (DeepSpeed's CPU ops among them): ``TORCH_EXTENSIONS_DIR``
    or torch's default root (``~/.cache/torch_extensions``), whose lock files sit two levels down."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return [Path(env)]
    from torch.utils.cpp_extension import get_default_build_root

    return [Path(get_default_build_root())]


def _lock_holders(lock: Path) -> list[int] | None:
    """Pids of processes with ``lock`` open (torch's FileBaton keeps it open while it builds or
    loads), or None where /proc cannot say."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target = os.path.realpath(lock)
    holders, unreadable = [], False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
        except PermissionError:  # another user's process: it might be the holder
            # (not pid 1 of a container or sandbox: an init that does not build torch extensions)
            unreadable = unreadable or entry.name != "1"
        except OSError:  # exited meanwhile
            continue
    return holders if holders or not unreadable else None


def stale_extension_locks(roots: list[Path] | None = None, grace_s: float = 30.0,
                          unknown_after_s: float = 600.0) -> list[Path]:
    """Lock files of torch/DeepSpeed extension builds that no live process holds.

    torch's FileBaton is a bare file created with O_EXCL and removed on release; a process killed
    while building or loading an op (DeepSpeed's shm_comm at start-up on CPU) leaves it behind, and
    every later load then waits for it forever without a word. A lock is stale when it is older than
    ``grace_s`` and no process has it open (or, where /proc is unavailable, older than
    ``unknown_after_s`` with nothing in its build directory touched since)."""
    stale = []
    now = time.time()
    for root in roots if roots is not None else extension_roots():
        if not root.is_dir():
            continue
        for lock in list(root.glob("*/lock")) + list(root.glob("*/*/lock")):
            try:
                age = now - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile
            if age < grace_s:
                continue
            holders = _lock_holders(lock)
            if holders:
                continue
            if holders is None:
                newest = max((p.stat().st_mtime for p in lock.parent.iterdir() if p.is_file()), default=0.0)
                if age < unknown_after_s or now - newest < unknown_after_s:
                    continue
            stale.append(lock)
    return stale


def check_extension_locks() -> None:
    """Refuse to start (instead of hanging) when a stale extension build lock would block DeepSpeed."""
    stale = stale_extension_locks()
    if stale:
        raise RunError(f"stale torch extension build lock {stale[0]}: a process was killed while building or loading "
                       f"the {stale[0].parent.name} op and no process holds it now, so DeepSpeed would wait for it "
                       f"forever; remove it (rm {' '.join(str(p) for p in stale)}) or set TORCH_EXTENSIONS_DIR to a "
                       "build directory of this environment's own")


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Works under deepspeed/torchrun/SLURM launchers, which set the
    usual env variables, and as one plain process, for which it sets them. ``timeout_s`` bounds every
    collective (``train.dist_timeout_s``; torch's default when None)."""
    import deepspeed  # a dependency, imported where used: it takes seconds to import

    if not torch.distributed.is_initialized():
        check_extension_locks()
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
