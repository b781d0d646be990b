"""Resumable checkpoints that survive a kill at any moment.

Layout of ``checkpoint_dir``::

    step-000040/          one complete checkpoint: DeepSpeed's files for this tag (trained
                          parameters, optimizer and scheduler shards; never the frozen base),
                          rng_rank<r>.pt per rank, trainer_state.json, delta.safetensors
    latest                the name of the newest complete checkpoint (replaced atomically)
    zero_to_fp32.py       DeepSpeed's recovery scripts (ZeRO 1-3), moved here out of .partial/
    .partial/step-000044/ a checkpoint being written (removed once committed)

A checkpoint is written under ``.partial/`` and renamed into place only after every rank has
finished, then ``latest`` is replaced; a process killed midway leaves the previous checkpoint and
``latest`` untouched. With node-local storage every node's local rank 0 does the renaming for its
node (``"checkpoint": {"use_node_local_storage": true}`` in the DeepSpeed JSON).

Every checkpoint ends with ``manifest.json`` (size and sha256 of each file), written last, before
the rename. With node-local storage each node lists its own files in ``manifest.rank<r>.json`` (r:
the global rank of the node's local rank 0), so the files every node holds are byte-identical
(safetensors headers are written in a fixed order) and the docs' rsync merge keeps every node's
manifest. :func:`verify` checks it; resuming from ``latest`` takes the newest checkpoint that
verifies, says which ones it skipped, and moves those aside into ``.corrupt/``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from ..delta import save_delta
from ..errors import RunError

logger = logging.getLogger("sparse_ft")

PARTIAL = ".partial"
LATEST = "latest"
_SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_")
MANIFEST = "manifest.json"
_NODE_MANIFEST = re.compile(r"manifest\.rank\d+\.json")
CORRUPT = ".corrupt"


class CorruptCheckpoint(Exception):
    """A checkpoint fails verification; ``str()`` names the file and what is wrong."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def node_manifest_name(rank: int) -> str:
    """The manifest of the node whose local rank 0 has global rank ``rank`` (node-local storage)."""
    return f"manifest.rank{rank}.json"


def _is_manifest(path: Path) -> bool:
    return path.name == MANIFEST or _NODE_MANIFEST.fullmatch(path.name) is not None


def manifests(directory: Path) -> list[Path]:
    """The manifests in a checkpoint directory: ``manifest.json``, or one per node (merged copies of
    node-local checkpoints hold several)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and _is_manifest(p))


def write_manifest(directory: Path, name: str = MANIFEST) -> None:
    """``name``: size and sha256 of every file under ``directory`` but manifests (written last)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not _is_manifest(p)):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    _write_atomic(directory / name, json.dumps({"format": "sparse-ft-checkpoint-manifest/1", "files": files},
                                                   indent=1))


def verify(directory: Path) -> bool:
    """Check ``directory`` against its manifests; raise :class:`CorruptCheckpoint` naming the first bad
    file. Returns False (nothing to check against) for a checkpoint written before manifests."""
    directory = Path(directory)
    found = manifests(directory) if directory.is_dir() else []
    if not found:
        state = directory / "trainer_state.json"
        try:
            recorded = json.loads(state.read_text()).get("manifest")
        except (OSError, ValueError, AttributeError) as e:
            raise CorruptCheckpoint(state, f"unreadable ({e})") from None
        if recorded == MANIFEST:  # written by a version that writes manifests: its manifest is gone
            raise CorruptCheckpoint(directory / MANIFEST, "missing")
        if recorded:
            raise CorruptCheckpoint(directory, f"no manifest (expected {recorded})")
        return False
    for manifest in found:
        _verify_against(directory, manifest)
    return True


def _verify_against(directory: Path, manifest: Path) -> None:
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(manifest, f"unreadable manifest ({e})") from None
    for rel, want in files.items():
        path = directory / rel
        if not path.is_file():
            raise CorruptCheckpoint(path, "missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CorruptCheckpoint(path, f"{size} bytes, the manifest says {want['size']} (truncated or replaced)")
        if file_sha256(path) != want["sha256"]:
            raise CorruptCheckpoint(path, "content differs from its sha256 in the manifest (corrupted)")


def newest_intact(root: Path, quarantine: bool = False) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` that verifies (``latest`` first), and one line per newer
    checkpoint skipped as corrupt. ``quarantine`` moves the skipped ones into ``.corrupt/`` so a
    resumed run writes those steps afresh."""
    root = Path(root)
    tags = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in tags:  # normally the newest; if not, still try it first
            tags.remove(named)
            tags.append(named)
    skipped = []
    for tag in reversed(tags):
        try:
            verify(root / tag)
        except CorruptCheckpoint as bad:
            skipped.append(str(bad))
            if quarantine:
                (root / CORRUPT).mkdir(exist_ok=True)
                dest = root / CORRUPT / f"{tag}-{os.getpid()}"
                os.replace(root / tag, dest)
                skipped[-1] += f" (moved to {dest})"
            continue
        return root / tag, skipped
    return None, skipped


def tag_for(stage: int, step: int) -> str:
    return f"step-{step:06d}" if stage == 0 else f"stage{stage}-step-{step:06d}"


def _order(tag: str) -> tuple[int, int]:
    stage = int(tag[5:tag.index("-")]) if tag.startswith("stage") else 0
    return stage, int(tag.rsplit("-", 1)[1])


def list_checkpoints(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p.name.startswith("step-") or p.name.startswith("stage"))
            and (p / "trainer_state.json").is_file()]
    return sorted(tags, key=_order)


def read_latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / "trainer_state.json").is_file():
            return root / tag
    tags = list_checkpoints(root)
    return root / tags[-1] if tags else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill signal leaves no temp file behind
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def trained_module_state_only(engine):
    """While saving, DeepSpeed's module state holds the trained parameters and buffers only.

    ``exclude_frozen_parameters`` drops frozen parameters by the names ``named_parameters()`` gives,
    which lists a shared tensor once: a tied output head (``lm_head.weight``, the embeddings under
    another name) stays, a full frozen copy in every checkpoint (114 MB for SmolLM2-135M). Entries a
    module writes beside its parameters stay too (bitsandbytes' ``weight.absmax``/``SCB`` quantization
    state of the frozen base). So everything that is not a trained parameter, under any of its names,
    or a buffer is dropped; the base comes from ``model.name_or_path`` on resume, as before."""
    module = engine.module
    keep = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
    original = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        state = original(*args, **kwargs)
        if state is not None and kwargs.get("exclude_frozen_parameters"):
            for key in [k for k in state if k not in keep]:
                del state[key]
        return state

    engine.module_state_dict = module_state_dict  # the engine calls self.module_state_dict(...)
    try:
        yield
    finally:
        del engine.module_state_dict


def _ranks_with_shards(path: Path) -> list[int]:
    ranks = {int(m.group(1)) for p in path.glob("*zero_pp_rank_*") if (m := _SHARD_RANK.search(p.name))}
    return sorted(ranks)


def check_rank_files(path: Path, rank: int) -> None:
    """Fail naming the rank, host and directory when this rank's files are not in ``path``:
    with node-local checkpoints every rank must run on the node that wrote its shards. (DeepSpeed's
    own error is a bare ``assert len(self.ckpt_list) > 0``.)"""
    shards = _ranks_with_shards(path)
    missing = []
    if shards and rank not in shards:
        missing.append(f"*zero_pp_rank_{rank}_* (the ZeRO shards of rank {rank}; this directory holds ranks "
                       f"{', '.join(map(str, shards))})")
    if not any(path.glob("*model_states.pt")):
        missing.append("*model_states.pt (DeepSpeed's module state)")
    if missing:
        raise CheckpointFilesMissing(
            f"resume from {path}: rank {rank} on host {socket.gethostname()} finds no {' and no '.join(missing)}. "
            "With node-local checkpoints each rank must run on the node that wrote its files (same hosts, "
            "same processes per node, same order); or copy every node's checkpoint directory into one "
            "(docs/multi-node.md)")


class CheckpointFilesMissing(RuntimeError):
    """A rank's checkpoint files are not where the resume looks for them."""


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, rank: int, local_rank: int, node_local: bool):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        # The process that renames and prunes: one per filesystem.
        self.is_writer = (local_rank == 0) if node_local else (rank == 0)
        # One manifest per filesystem: per node (named by its writer's rank) when node-local.
        self.manifest_name = node_manifest_name(rank) if node_local else MANIFEST
        self.recorded_manifest = "manifest.rank<r>.json (one per node)" if node_local else MANIFEST

    def save(self, engine, stage: int, step: int, trainer_state: dict, base_model: str | None,
             delta_metadata: dict | None = None) -> Path:
        """Collective: every rank must call it."""
        tag = tag_for(stage, step)
        final = self.root / tag
        partial_root = self.root / PARTIAL
        if final.is_dir() and (final / "trainer_state.json").is_file():
            return final  # already saved (the end of a run that resumed at its last step; it verified)
        if self.is_writer:
            shutil.rmtree(partial_root / tag, ignore_errors=True)
            partial_root.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        try:
            with trained_module_state_only(engine):
                engine.save_checkpoint(str(partial_root), tag=tag, client_state={"stage": stage, "step": step},
                                       save_latest=False, exclude_frozen_parameters=True)
            torch.save(rng_state(), partial_root / tag / f"rng_rank{self.rank}.pt")
            save_delta(engine.module, partial_root / tag / "delta.safetensors", base_model=base_model, engine=engine,
                       write=self.is_writer, extra_metadata=delta_metadata)
            if self.is_writer:
                _write_atomic(partial_root / tag / "trainer_state.json",
                              json.dumps({**trainer_state, "manifest": self.recorded_manifest}, indent=1))
            torch.distributed.barrier()
            if self.is_writer:
                write_manifest(partial_root / tag, self.manifest_name)  # last: every rank's files are complete
                self._commit(tag)
        except OSError as e:
            if self.is_writer:
                shutil.rmtree(partial_root / tag, ignore_errors=True)
            kept = read_latest(self.root)
            raise RunError(f"writing checkpoint {tag} under {self.root} failed ({e.strerror or e}); "
                           f"{'the previous checkpoint ' + str(kept) + ' is intact' if kept else 'no checkpoint kept'}"
                           "; free space or fix permissions there, then resume with train.resume_from=latest"
                           ) from e
        torch.distributed.barrier()
        logger.info("checkpoint written: %s", final)
        return final

    def _commit(self, tag: str) -> None:
        """Make a fully written checkpoint visible: rename it into place, then move ``latest``."""
        os.replace(self.root / PARTIAL / tag, self.root / tag)
        _write_atomic(self.root / LATEST, tag)
        self._prune(keep=tag)
        self._tidy_partial()

    def _tidy_partial(self) -> None:
        """DeepSpeed copies its recovery scripts (``zero_to_fp32.py``) into the directory it saves to,
        ``.partial/``: move them beside the checkpoints they read, then remove ``.partial/`` if empty."""
        partial = self.root / PARTIAL
        for script in partial.glob("*.py"):
            os.replace(script, self.root / script.name)
        with contextlib.suppress(OSError):
            partial.rmdir()  # not empty: something else is being written there; leave it

    def _prune(self, keep: str) -> None:
        for stale in self.root.glob(LATEST + ".tmp*"):  # left by a process killed while moving `latest`
            stale.unlink(missing_ok=True)
        tags = [t for t in list_checkpoints(self.root) if t != keep]
        excess = len(tags) + 1 - self.keep_last
        for tag in tags[:max(0, excess)]:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine, path: Path) -> dict:
        """Restore engine state and this rank's RNG from ``path``; returns trainer_state."""
        path = Path(path)
        state = read_state(path)
        check_rank_files(path, self.rank)
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            try:
                rng = torch.load(rng_file, weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
                    raise RunError(f"{rng_file} is unreadable ({type(e).__name__}); resume from an earlier checkpoint "
                               "(train.resume_from=<dir>) or remove this one") from None
            set_rng_state(rng)
        else:
            logger.warning("no RNG state for rank %d in %s (different world size?); dropout streams will differ",
                           self.rank, path)
        return state


def read_state(path: Path) -> dict:
    """``trainer_state.json`` of checkpoint ``path``; a damaged one is a RunError naming it."""
    file = Path(path) / "trainer_state.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{file} is unreadable ({e}); resume from an earlier checkpoint (train.resume_from=<dir>) "
                       "or remove this one") from None
