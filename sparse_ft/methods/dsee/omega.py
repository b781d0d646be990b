"""DSEE's sparse positions Omega: GreBsmo on each pretrained target matrix, top-N of ``|S|``.

Distributed (DESIGN.md section 3): under ZeRO-3 no rank holds the model, so the target matrices
are dealt round-robin to ranks. In round ``j`` every rank enters the collective gather of each of
the round's ``world`` matrices in turn and the matrix's owner keeps an fp32 copy; then every rank
decomposes its own matrix, in parallel. A rank holds at most its own copy plus the one being
gathered. The N positions per matrix are all-gathered once at the end. Each matrix's random draws
are seeded by (seed, its name), so 1 rank and any number of ranks give the same Omega.

The result is cached in a file keyed by a fingerprint of the base weights and the settings, read
by rank 0 and broadcast, so a restart (or a second run on the same base) skips the decomposition.
``sparse-ft rpca`` computes the same file outside training, streaming the target matrices from
the checkpoint's shards; ``method.omega_file`` points a run at it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...delta_file import save_safetensors
from ...errors import ConfigError
from ...quant import dequantize
from ...rpca import grebsmo, select_omega
from ...zero import dist_info, full_numel, gathered
from ..base import name_seed
from ..fingerprint import check_fingerprint, fingerprint

logger = logging.getLogger("sparse_ft")

FORMAT = "sparse-ft-omega/1"
# Part of the cache key: bump when the decomposition or the selection changes its output.
ALGORITHM = "grebsmo/1"


@dataclass(frozen=True)
class RPCASettings:
    """What determines Omega besides the base weights (the cache key holds all of it)."""

    n_sparse: int = 16
    rank_cap: int = 32
    tau: float = 3.0
    steps: int = 10
    inner: int = 2
    dr: int = 4
    tol: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def decompose(weight: torch.Tensor, name: str, settings: RPCASettings) -> tuple[torch.Tensor, dict]:
    """Omega of one matrix (sorted int64 flat positions) and a few statistics of its RPCA."""
    t0 = time.perf_counter()
    res = grebsmo(weight, rank_cap=settings.rank_cap, tau=settings.tau, steps=settings.steps, inner=settings.inner,
                  dr=settings.dr, seed=name_seed(settings.seed, "rpca:" + name), tol=settings.tol)
    omega = select_omega(res.S, settings.n_sparse, res.R)
    stats = {"rank": res.rank, "rel_error": min(res.errors), "steps": len(res.errors),
             "nnz_S": int((res.S != 0).sum()), "seconds": time.perf_counter() - t0}
    return omega.cpu(), stats


def _comm_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


STAT_KEYS = ("rank", "rel_error", "steps", "nnz_S", "seconds")


@torch.no_grad()
def compute_omega(model: nn.Module, names: list[str], settings: RPCASettings, progress: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Omega for every module in ``names`` (same list, same order, on every rank). Collective.

    Returns ``({name: sorted int64 positions}, {name: stats})``, identical on every rank.
    """
    rank, world = dist_info()
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    n_rounds = -(-len(names) // world)
    width = max(min(settings.n_sparse, full_numel(w)) for w in weights)
    mine_idx = torch.full((n_rounds, width), -1, dtype=torch.int64)
    mine_stats = torch.zeros((n_rounds, len(STAT_KEYS)), dtype=torch.float64)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), desc="DSEE RPCA (Omega)", unit="matrix", dynamic_ncols=True)
    for j in range(n_rounds):
        own = None
        for i in range(j * world, min((j + 1) * world, len(names))):
            with gathered([weights[i]]):  # every rank enters every gather
                if i % world == rank:
                    own = dequantize(weights[i], torch.float32)  # a plain weight: an fp32 copy
        if own is not None:
            i = j * world + rank
            omega, stats = decompose(own, names[i], settings)
            del own
            mine_idx[j, :omega.numel()] = omega
            mine_stats[j] = torch.tensor([float(stats[k]) for k in STAT_KEYS], dtype=torch.float64)
        if bar is not None:
            bar.update(min((j + 1) * world, len(names)) - j * world)
    if bar is not None:
        bar.close()
    if world > 1:
        device = _comm_device()
        all_idx = [torch.empty_like(mine_idx, device=device) for _ in range(world)]
        all_stats = [torch.empty_like(mine_stats, device=device) for _ in range(world)]
        torch.distributed.all_gather(all_idx, mine_idx.to(device))
        torch.distributed.all_gather(all_stats, mine_stats.to(device))
        all_idx = [t.cpu() for t in all_idx]
        all_stats = [t.cpu() for t in all_stats]
    else:
        all_idx, all_stats = [mine_idx], [mine_stats]
    omega_all, stats_all = {}, {}
    for i, name in enumerate(names):
        row = all_idx[i % world][i // world]
        omega_all[name] = row[row >= 0].clone()
        vals = all_stats[i % world][i // world].tolist()
        stats_all[name] = {k: (int(v) if k in ("rank", "steps", "nnz_S") else v) for k, v in zip(STAT_KEYS, vals)}
    return omega_all, stats_all


# -- files ---------------------------------------------------------------------------------------
def write_omega_file(path: str | os.PathLike, omega: dict[str, torch.Tensor], settings: RPCASettings,
                     fingerprint: dict, stats: dict | None = None, base_model: str = "") -> Path:
    """Atomically write ``{name}.indices`` tensors plus settings and base fingerprint metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.indices": idx.to(torch.int64).contiguous() for name, idx in omega.items()}
    meta = {"format": FORMAT, "targets": json.dumps(list(omega)), "settings": json.dumps(settings.to_dict()),
            "base_fingerprint": json.dumps(fingerprint), "stats": json.dumps(stats or {}), "base_model": str(base_model)}
    save_safetensors(tensors, path, meta)
    return path


def read_omega_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(``{name: int64 positions}``, metadata with JSON fields decoded)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ConfigError(f"method.omega_file: {path} is not a sparse-ft Omega file (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r}); write one with 'sparse-ft rpca'")
        omega = {k[:-len(".indices")]: f.get_tensor(k).to(torch.int64) for k in f.keys() if k.endswith(".indices")}
    for key in ("targets", "settings", "base_fingerprint", "stats"):
        meta[key] = json.loads(meta.get(key) or "{}")
    return omega, meta


def _broadcast_from_rank0(obj):
    rank, world = dist_info()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def cache_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    root = Path(os.environ.get("SPARSE_FT_CACHE", Path.home() / ".cache" / "sparse_ft"))
    return root / "omega"


def cache_key(fingerprint: dict, names: list[str], settings: RPCASettings) -> str:
    blob = json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "fingerprint": fingerprint, "targets": names, "settings": settings.to_dict()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def omega_for_model(model: nn.Module, names: list[str], settings: RPCASettings, omega_file: str | None = None,
                    cache: str | None = None) -> dict[str, torch.Tensor]:
    """Omega of ``names``: from ``omega_file`` if given, else the cache, else computed (and cached).
    Collective under ZeRO-3 and with several processes: call on every rank."""
    rank, _ = dist_info()
    if omega_file:
        loaded = None
        if rank == 0:
            if not Path(omega_file).is_file():
                loaded = ConfigError(f"method.omega_file: {omega_file} does not exist")
            else:
                try:
                    loaded = read_omega_file(omega_file)
                except ConfigError as e:
                    loaded = e
        loaded = _broadcast_from_rank0(loaded)
        if isinstance(loaded, ConfigError):
            raise loaded
        omega, meta = loaded
        missing = [n for n in names if n not in omega]
        if missing:
            raise ConfigError(f"method.omega_file {omega_file} has no Omega for {missing[:3]} "
                              f"({len(missing)} of {len(names)} targets); it was computed for "
                              f"{meta['targets'][:3]}...; recompute it with these method.target_modules")
        if meta["settings"].get("n_sparse") != settings.n_sparse:
            raise ConfigError(f"method.n_sparse = {settings.n_sparse}, but method.omega_file {omega_file} holds "
                              f"{meta['settings'].get('n_sparse')} positions per matrix")
        expected = {"matrices": {n: meta["base_fingerprint"]["matrices"][n] for n in names
                                 if n in meta["base_fingerprint"].get("matrices", {})}}
        check_fingerprint(expected, model)
        logger.info("DSEE Omega read from method.omega_file %s", omega_file)
        return {n: omega[n] for n in names}

    fp = fingerprint(model, names)
    path = cache_dir(cache) / f"omega-{cache_key(fp, names, settings)}.safetensors"
    hit = None
    if rank == 0 and path.is_file():
        try:
            hit = read_omega_file(path)[0]
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed
            logger.warning("ignoring unreadable Omega cache %s: %s", path, e)
    hit = _broadcast_from_rank0(hit)
    if hit is not None and all(n in hit for n in names):
        logger.info("DSEE Omega read from cache %s", path)
        return {n: hit[n] for n in names}
    t0 = time.perf_counter()
    omega, stats = compute_omega(model, names, settings)
    errors = [s["rel_error"] for s in stats.values()]
    logger.info("DSEE Omega: GreBsmo on %d matrices in %.1fs (relative error %.3f..%.3f, ranks %d..%d)",
                len(names), time.perf_counter() - t0, min(errors), max(errors),
                min(s["rank"] for s in stats.values()), max(s["rank"] for s in stats.values()))
    if rank == 0:
        try:
            write_omega_file(path, omega, settings, fp, stats,
                             base_model=getattr(getattr(model, "config", None), "_name_or_path", ""))
            logger.info("DSEE Omega cached in %s", path)
        except OSError as e:
            logger.warning("could not write the Omega cache %s: %s", path, e)
    return omega
