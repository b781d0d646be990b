"""The compact delta's file format, at the bottom of the package: a safetensors file whose metadata
says ``format: sparse-ft-delta/1`` and holds JSON fields. Reading it needs no model and no method
(:mod:`sparse_ft.delta` builds and applies deltas on models; methods such as ProPETL rewrite files).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConfigError

FORMAT = "sparse-ft-delta/1"


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with JSON fields decoded) of a delta file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"delta file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a sparse-ft delta (format {meta.get('format')!r}, expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    decoded = dict(meta)
    for key in ("method", "base_fingerprint"):
        decoded[key] = json.loads(meta[key])
    decoded["quantization"] = json.loads(meta["quantization"]) if "quantization" in meta else None
    return tensors, decoded


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (dtype and shape are checked by safetensors itself); the
    delta's metadata ``tensor_sha256`` maps each tensor's name to it."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, atomic and with a reproducible header.

    Written under a temporary name beside ``path`` and renamed into place: a crash, a kill or a full
    disk leaves whatever was at ``path`` before, and no temporary file. The same tensors and metadata
    give the same bytes in every process: see :func:`_sort_metadata_in_place`."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _sort_metadata_in_place(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sort_metadata_in_place(path: Path) -> None:
    """safetensors writes its ``__metadata__`` map in hash order, which differs from one save to the
    next, so the same delta written on two nodes (node-local checkpoints) or by two runs had different
    sha256s. The header is rewritten with sorted metadata keys; its length and every data offset stay
    as they are."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= size:  # always, as the same content; padded as safetensors pads (spaces)
            f.seek(8)
            f.write(canonical + b" " * (size - len(canonical)))
