"""Checkpoint manifests with node-local storage: one per node, so a merged copy verifies every node's
files (sparse_ft.training.checkpoint)."""
from __future__ import annotations

import json
import shutil

import pytest

from sparse_ft.training import checkpoint as ckpt


def node_dir(root, rank, shard_bytes):
    """A node's copy of one checkpoint: files every node writes, and this node's shard."""
    d = root / f"node-rank{rank}" / "step-000002"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": 2, "manifest": "manifest.rank<r>.json (one per node)"}))
    (d / "delta.safetensors").write_bytes(b"same on every node")
    (d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(shard_bytes)
    ckpt.write_manifest(d, ckpt.node_manifest_name(rank))
    return d


def test_merged_node_local_checkpoint_verifies_every_node(tmp_path):
    a, b = node_dir(tmp_path, 0, b"rank 0 shard"), node_dir(tmp_path, 1, b"rank 1 shard")
    # The files both nodes hold are identical, manifests included only by their own names.
    assert sorted(p.name for p in ckpt.manifests(a)) == ["manifest.rank0.json"]
    assert ckpt.verify(a) and ckpt.verify(b)
    merged = tmp_path / "merged" / "step-000002"
    shutil.copytree(a, merged)
    shutil.copytree(b, merged, dirs_exist_ok=True)  # what rsync of both nodes into one directory does
    assert [p.name for p in ckpt.manifests(merged)] == ["manifest.rank0.json", "manifest.rank1.json"]
    assert ckpt.verify(merged)
    # A damaged shard of the second node is caught through that node's manifest.
    (merged / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"rank 1 shard, damaged")
    with pytest.raises(ckpt.CorruptCheckpoint, match="zero_pp_rank_1_.*manifest says"):
        ckpt.verify(merged)


def test_node_manifest_missing_is_named(tmp_path):
    d = node_dir(tmp_path, 0, b"x")
    (d / ckpt.node_manifest_name(0)).unlink()
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"no manifest \(expected manifest.rank<r>.json"):
        ckpt.verify(d)
