"""sparse_ft.delta_file.save_safetensors: the same tensors and metadata give the same bytes."""
from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open

from sparse_ft.delta_file import save_safetensors


def test_same_content_same_bytes(tmp_path):
    """safetensors writes its metadata map in hash order, which differs between calls (even in one
    process); ours must not. Eight keys: the plain writer repeats an order once in 40320 calls."""
    tensors = {"b.values": torch.arange(6, dtype=torch.float32), "a.indices": torch.arange(3, dtype=torch.int64)}
    metadata = {f"key{i}": f"value {i} é" for i in range(8)}
    digests = set()
    for i in range(4):
        path = tmp_path / f"d{i}.safetensors"
        save_safetensors(tensors, path, metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        with safe_open(str(path), "pt") as f:  # still a valid file with the same content
            assert f.metadata() == metadata
            assert {k: f.get_tensor(k) for k in f.keys()}.keys() == tensors.keys()
            assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert len(digests) == 1
