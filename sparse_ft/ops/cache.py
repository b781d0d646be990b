"""The per-machine cache of measured decisions and converted files: one root directory,
``$SPARSE_FT_CACHE`` (default ``~/.cache/sparse_ft``), and small JSON tables in it that are read
whole and replaced atomically, so concurrent processes never see half a file.

Users: the SDDMM crossover table (:mod:`.crossover`), the CPU precision probe
(:mod:`.cpu_precision`) and the GGUF conversion cache (:mod:`sparse_ft.training.model`).
No torch here: the CLI reads it on its fast path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SPARSE_FT_CACHE", Path.home() / ".cache" / "sparse_ft"))


def safe_name(name: str) -> str:
    """``name`` with every character outside [A-Za-z0-9] replaced by ``_`` (a file-name part)."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def table_file(kind: str, name: str) -> Path:
    """The JSON table of ``kind`` (e.g. ``sddmm_crossover``) for one device or CPU ``name``."""
    return cache_root() / f"{kind}_{safe_name(name)}.json"


def read_table(path: Path) -> dict:
    """The table's entries; empty when the file is missing or unreadable (a re-measurement is the
    only cost of a lost cache)."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_table(path: Path, entries: dict) -> bool:
    """Replace the table atomically (temporary file, then rename). False when it cannot be written
    (a read-only home): callers carry on with what they measured."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        return False
    return True
