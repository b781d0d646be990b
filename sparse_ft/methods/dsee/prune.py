"""DSEE's pruning after the first stage (paper 004, Algorithm 2), and its enforcement afterwards.

Unstructured: the adapted matrices lose the ``prune_ratio`` fraction of their entries with the
smallest ``|dW|`` (one threshold over all of them); the other linear layers lose the
``prune_ratio_other`` fraction with the smallest ``|W|`` (one threshold over all of those). The
counts are exact: entries tied at the threshold are pruned in a fixed global order (module order,
then flat position), so 1 rank and N ranks prune the same entries.

Structured: per attention layer, each query head scores ``sum |dW_q|`` over its rows plus its
share of ``sum |dW_v|`` over its key/value head's rows (``1/g`` of it, g = query heads per
key/value head; likewise ``dW_k`` if k is adapted). The ``prune_heads`` lowest heads lose their
rows of ``q`` and their columns of ``o``. Under grouped-query attention a key/value head is shared
by ``g`` query heads: its rows of ``k`` and ``v`` are zeroed only when all ``g`` of them are pruned
(the surviving heads still read it). With ``g = 1`` (multi-head attention) that is simply the
pruned heads' rows of q, k, v.

Under ZeRO-3 no matrix is gathered: each rank reads and zeroes its own shard (``param.ds_tensor``)
and the global thresholds come from two all-reduced histograms over the float bit patterns of the
scores (a radix select: 65536 bins on the high bits, then 32768 on the low bits of the winning
bin), plus one all-gather of per-shard tie counts. ``|dW|`` only needs each layer's small factors,
which are gathered whole.

The result ("pruning state") is a dict of small tensors, stored in the compact delta
(``model_delta_tensors``), in ``<output_dir>/dsee_pruning.safetensors`` for resume, and read by
the offline export:

- ``dsee_prune.<module>.keep_bits``: adapted matrix, unstructured: bit-packed keep mask;
- ``dsee_prune.other_threshold`` (one value, in the dtype the scores were taken in) and
  ``dsee_prune.<module>.ties``: other matrices, unstructured: ``|W| < threshold`` is pruned, and
  the first ``ties`` entries equal to it (in flat order) -- recomputed from the base weights;
- ``dsee_prune.<module>.rows`` / ``.cols``: structured: the zeroed rows / columns;
  ``dsee_prune.<attention>.heads``: the pruned query heads (for the record).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ...zero import dist_info, full_numel, full_shape, gathered, is_partitioned
from ..base import count_parameters, matches
from ..fingerprint import fingerprint
from .layer import DSEELinear, bits_at, pack_bits, unpack_bits

logger = logging.getLogger("sparse_ft")

PREFIX = "dsee_prune."
STATE_ATTR = "sparse_ft_dsee_pruning"
BASE_FINGERPRINT_ATTR = "sparse_ft_base_fingerprint"
ROW_BLOCK = 64  # |dW| is computed in row blocks aligned to the matrix, so any sharding gives the same bits


# -- shards --------------------------------------------------------------------------------------
@dataclass
class LocalPart:
    flat: torch.Tensor
    """Writable 1-D view of this rank's entries of the parameter (all of them when not partitioned)."""
    lo: int
    """Flat position of ``flat[0]`` in the whole parameter."""


def _release(param: torch.Tensor) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        if param.ds_active_sub_modules:
            raise RuntimeError(f"cannot prune {param.ds_summary()} while a module is using it; prune between engines")
        param.partition()


def local_part(param: torch.Tensor) -> LocalPart:
    """This rank's shard of a ZeRO-3 parameter (``ds_tensor``: flat elements ``[rank P, rank P + P)``
    of the parameter, padded at the end), or the whole parameter when it is not partitioned."""
    if not is_partitioned(param):
        return LocalPart(param.data.view(-1), 0)
    _release(param)
    _, world = dist_info()
    if getattr(param, "ds_zero_partition_world_size", world) != world:
        raise NotImplementedError("DSEE pruning expects ZeRO-3 to partition parameters over all ranks")
    part = param.ds_tensor
    size = int(part.ds_numel)
    rank = int(getattr(param, "ds_zero_partition_rank", dist_info()[0]))
    lo = rank * size
    valid = max(0, min(size, int(param.ds_numel) - lo))
    return LocalPart(part.data.view(-1)[:valid], min(lo, int(param.ds_numel)))


class _Comm:
    """Collectives over all ranks when parameters are partitioned; no-ops when every rank holds the
    whole model (each rank then computes everything itself, identically)."""

    def __init__(self, partitioned: bool):
        self.rank, world = dist_info()
        self.world = world if partitioned else 1
        if self.world == 1:
            self.rank = 0
        self.device = torch.device("cpu")
        if self.world > 1 and torch.distributed.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        out = t.to(self.device)
        torch.distributed.all_reduce(out)
        return out.to(t.device)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [t]
        src = t.to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world)]
        torch.distributed.all_gather(out, src)
        return [o.to(t.device) for o in out]


# -- exact k-th smallest over distributed non-negative fp32 scores ------------------------------
def _bits(scores: torch.Tensor) -> torch.Tensor:
    return scores.float().contiguous().view(torch.int32)


def radix_select(chunks, k: int, comm: _Comm) -> tuple[int, int]:
    """The bit pattern ``t`` of the ``k``-th smallest score (1-based) over all ranks' chunks, and
    how many scores are strictly smaller. ``chunks()`` yields this rank's non-negative fp32 scores
    (for non-negative floats the int32 bit pattern orders like the value)."""
    hist = None
    for s in chunks():
        h = torch.bincount((_bits(s) >> 15).long(), minlength=1 << 16)
        hist = h if hist is None else hist + h
    hist = comm.all_reduce(hist.cpu() if hist is not None else torch.zeros(1 << 16, dtype=torch.int64))
    cum = hist.cumsum(0)
    hi = int(torch.searchsorted(cum, torch.tensor(k)))
    below = int(cum[hi - 1]) if hi > 0 else 0
    hist2 = torch.zeros(1 << 15, dtype=torch.int64)
    for s in chunks():
        b = _bits(s)
        hist2 += torch.bincount((b[(b >> 15) == hi] & 0x7FFF).long(), minlength=1 << 15).cpu()
    hist2 = comm.all_reduce(hist2)
    cum2 = hist2.cumsum(0)
    lo = int(torch.searchsorted(cum2, torch.tensor(k - below)))
    less = below + (int(cum2[lo - 1]) if lo > 0 else 0)
    return (hi << 15) | lo, less


def tie_quota(local_ties: list[int], ties_needed: int, comm: _Comm) -> tuple[list[int], list[int]]:
    """Given this rank's count of threshold-tied entries in each matrix's shard, how many of them
    to prune (ties go in global order: matrix, then rank = flat position), and per matrix the total."""
    counts = torch.stack(comm.all_gather(torch.tensor(local_ties, dtype=torch.int64)))  # world x M
    before_matrix = torch.cumsum(counts.sum(0), 0) - counts.sum(0)
    before_rank = torch.cumsum(counts, 0) - counts
    offset = before_matrix + before_rank[comm.rank]
    mine = (ties_needed - offset).clamp(min=0).minimum(counts[comm.rank])
    per_matrix = (ties_needed - before_matrix).clamp(min=0).minimum(counts.sum(0))
    return mine.tolist(), per_matrix.tolist()


def _first_true(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``mask`` with only its first ``n`` True entries kept."""
    if n <= 0:
        return torch.zeros_like(mask)
    return mask & (torch.cumsum(mask.to(torch.int64), 0) <= n)


# -- what gets pruned ----------------------------------------------------------------------------
def adapted_layers(model: nn.Module) -> list[tuple[str, DSEELinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DSEELinear)]


def other_matrices(model: nn.Module, exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """Linear layers not adapted by DSEE and not excluded (``lm_head`` by default)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(matches(name, e) for e in exclude):
            out.append((name, module))
    return out


@torch.no_grad()
def _factors(layer: DSEELinear, device) -> dict:
    """The layer's small trained tensors, whole, fp32 (gathered under ZeRO-3; collective)."""
    with gathered([layer.lora_A, layer.lora_B, layer.values]):
        return {"A": layer.lora_A.detach().to(device, torch.float32, copy=True),
                "B": layer.lora_B.detach().to(device, torch.float32, copy=True),
                "values": layer.values.detach().to(device, torch.float32, copy=True),
                "indices": layer.indices.to(device, torch.int64), "scale": layer.scale,
                "shape": tuple(full_shape(layer.weight))}


def _delta_abs(f: dict, lo: int, hi: int) -> torch.Tensor:
    """``|dW|`` (fp32) at flat positions ``[lo, hi)``, from row blocks aligned to the matrix."""
    m, n = f["shape"]
    if hi <= lo:
        return torch.zeros(0, dtype=torch.float32, device=f["A"].device)
    r0 = (lo // n) // ROW_BLOCK * ROW_BLOCK
    r1 = -(-hi // n)
    A, B = f["A"].double(), f["B"].double()
    blocks = [(B[s:min(s + ROW_BLOCK, m)] @ A) for s in range(r0, r1, ROW_BLOCK)]
    dense = torch.cat(blocks).reshape(-1)
    idx, vals = f["indices"], f["values"].double()
    sel = (idx >= r0 * n) & (idx < r0 * n + dense.numel())
    dense.index_add_(0, idx[sel] - r0 * n, vals[sel])
    return (dense[lo - r0 * n:hi - r0 * n] * f["scale"]).abs().float()


# -- computing the pruning -----------------------------------------------------------------------
@torch.no_grad()
def compute_unstructured(model: nn.Module, ratio: float, ratio_other: float, exclude: list[str]) -> dict:
    adapted = adapted_layers(model)
    others = [(n, m) for n, m in other_matrices(model, exclude)] if ratio_other > 0 else []
    partitioned = any(is_partitioned(m.weight) for _, m in adapted + others)
    comm = _Comm(partitioned)
    state: dict[str, torch.Tensor] = {}

    if adapted and ratio > 0:
        device = adapted[0][1].indices.device
        factors = [_factors(layer, device) for _, layer in adapted]
        parts = [local_part(layer.weight) for _, layer in adapted]

        def chunks():
            for f, p in zip(factors, parts):
                yield _delta_abs(f, p.lo, p.lo + p.flat.numel())

        total = sum(f["shape"][0] * f["shape"][1] for f in factors)
        k = round(ratio * total)
        if k > 0:
            t, less = radix_select(chunks, k, comm)
            local_ties = [int((_bits(s) == t).sum()) for s in chunks()]
            mine, _ = tie_quota(local_ties, k - less, comm)
            for (name, layer), f, p, s, quota in zip(adapted, factors, parts, chunks(), mine):
                b = _bits(s)
                pruned = (b < t) | _first_true(b == t, quota)
                # Every rank needs the whole mask (the layer's forward masks the whole dW): gather
                # the bit-packed shards, each padded to the partition size.
                size = int(layer.weight.ds_tensor.ds_numel) if comm.world > 1 else p.flat.numel()
                keep = torch.ones(size, dtype=torch.bool, device=pruned.device)
                keep[:pruned.numel()] = ~pruned
                shards = comm.all_gather(pack_bits(keep))
                m, n = f["shape"]
                full = torch.cat([unpack_bits(sh, size) for sh in shards])[:m * n]
                state[f"{PREFIX}{name}.keep_bits"] = pack_bits(full).cpu()

    if others:
        parts = [local_part(mod.weight) for _, mod in others]
        dtype = others[0][1].weight.dtype

        def chunks():
            for p in parts:
                yield p.flat.to(dtype).abs().float()

        total = sum(int(full_shape(mod.weight).numel()) for _, mod in others)
        k = round(ratio_other * total)
        if k > 0:
            t, less = radix_select(chunks, k, comm)
            local_ties = [int((_bits(s) == t).sum()) for s in chunks()]
            _, per_matrix = tie_quota(local_ties, k - less, comm)
            state[f"{PREFIX}other_threshold"] = torch.tensor([t], dtype=torch.int32).view(torch.float32).to(dtype)
            for (name, _), ties in zip(others, per_matrix):
                state[f"{PREFIX}{name}.ties"] = torch.tensor([ties], dtype=torch.int64)
    return state


def attention_modules(model: nn.Module) -> list[tuple[str, dict[str, str]]]:
    """``[(attention module name, {"q": name, "k": ..., "v": ..., "o": ...})]`` for LLaMA/OPT-style
    attention (q_proj, k_proj, v_proj and o_proj or out_proj children)."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        o = "o_proj" if "o_proj" in children else "out_proj" if "out_proj" in children else None
        if o and all(c in children for c in ("q_proj", "k_proj", "v_proj")):
            pre = f"{name}." if name else ""
            found.append((name, {"q": pre + "q_proj", "k": pre + "k_proj", "v": pre + "v_proj", "o": pre + o}))
    return found


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the model config."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        raise ConfigError("method.prune = structured needs the model config's num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


@torch.no_grad()
def compute_structured(model: nn.Module, n_heads: int) -> dict:
    heads, kv, hd = head_layout(model)
    if not 0 < n_heads < heads:
        raise ConfigError(f"method.prune_heads = {n_heads}; allowed: 1..{heads - 1} (this model has {heads} "
                          "attention heads per layer)")
    group = heads // kv
    modules = dict(model.named_modules())
    attn = attention_modules(model)
    if not attn:
        raise ConfigError("method.prune = structured: found no attention module with q_proj, k_proj, v_proj and "
                          "o_proj/out_proj children")
    state: dict[str, torch.Tensor] = {}
    for attn_name, names in attn:
        q_rows = full_shape(modules[names["q"]].weight)[0]
        k_rows = full_shape(modules[names["k"]].weight)[0]
        if q_rows != heads * hd or k_rows != kv * hd:
            raise ConfigError(f"{attn_name}: q/k have {q_rows}/{k_rows} rows, not {heads}x{hd}/{kv}x{hd} as the model "
                              "config says; structured pruning cannot tell its heads apart")
        score = torch.zeros(heads, dtype=torch.float64)
        adapted_any = False
        for role in ("q", "k", "v"):
            layer = modules[names[role]]
            if not isinstance(layer, DSEELinear):
                continue
            adapted_any = True
            f = _factors(layer, layer.indices.device)
            m, n = f["shape"]
            row_sums = torch.cat([_delta_abs(f, s * n, min(s + ROW_BLOCK, m) * n).double().view(-1, n).sum(1)
                                  for s in range(0, m, ROW_BLOCK)]).cpu()
            per_head = row_sums.view(-1, hd).sum(1)
            score += per_head if role == "q" else per_head.repeat_interleave(group) / group
        if not adapted_any:
            raise ConfigError(f"method.prune = structured scores heads by |dW| of q, k or v, but {attn_name} has "
                              "none of them adapted; add q_proj or v_proj to method.target_modules")
        # Lowest scores first; equal scores go by head index (a stable order on every rank).
        order = sorted(range(heads), key=lambda h: (float(score[h]), h))
        pruned = sorted(order[:n_heads])
        kv_pruned = [g for g in range(kv) if all(h in pruned for h in range(g * group, (g + 1) * group))]

        def span(units):
            return torch.tensor([u * hd + i for u in units for i in range(hd)], dtype=torch.int64)

        state[f"{PREFIX}{attn_name}.heads"] = torch.tensor(pruned, dtype=torch.int64)
        state[f"{PREFIX}{names['q']}.rows"] = span(pruned)
        if kv_pruned:
            state[f"{PREFIX}{names['k']}.rows"] = span(kv_pruned)
            state[f"{PREFIX}{names['v']}.rows"] = span(kv_pruned)
        state[f"{PREFIX}{names['o']}.cols"] = span(pruned)
    return state


# -- applying a pruning state --------------------------------------------------------------------
def state_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {kind: tensor}}`` for the modules whose weights ``state`` prunes."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            continue
        name, _, kind = key[len(PREFIX):].rpartition(".")
        if kind in ("keep_bits", "ties", "rows", "cols"):
            out.setdefault(name, {})[kind] = tensor
    return out


def split_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(PREFIX)}


def keep_mask_rule(weight: torch.Tensor, threshold: torch.Tensor, ties: int) -> torch.Tensor:
    """Keep mask (flat bool) of an "other" matrix from the unstructured rule, given whole."""
    b = _bits(weight.reshape(-1).to(threshold.dtype).abs())
    t = int(_bits(threshold.reshape(1).abs())[0])
    return ~((b < t) | _first_true(b == t, int(ties)))


def keep_mask_dense(entry: dict[str, torch.Tensor], weight: torch.Tensor, threshold=None) -> torch.Tensor:
    """Keep mask (m x n bool) of a whole matrix from its state entry (for export)."""
    m, n = weight.shape
    if "keep_bits" in entry:
        return unpack_bits(entry["keep_bits"], m * n).view(m, n)
    if "ties" in entry:
        if threshold is None:
            raise ValueError("the unstructured rule needs dsee_prune.other_threshold")
        return keep_mask_rule(weight, threshold, int(entry["ties"][0])).view(m, n)
    keep = torch.ones(m, n, dtype=torch.bool)
    if "rows" in entry:
        keep[entry["rows"].to(torch.int64)] = False
    if "cols" in entry:
        keep[:, entry["cols"].to(torch.int64)] = False
    return keep


@torch.no_grad()
def apply_pruning(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Zero the pruned entries of the base weights (each rank its own shard under ZeRO-3), install
    the keep masks on the DSEE layers, and remember ``state`` on the model (the compact delta
    stores it). Collective. Returns ``{module: (pruned entries, numel)}``, the same on every rank.

    The base fingerprint is taken first, so deltas saved later still identify the unpruned base.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already pruned")
    object.__setattr__(model, BASE_FINGERPRINT_ATTR, fingerprint(model))
    modules = dict(model.named_modules())
    entries = state_modules(state)
    missing = [n for n in entries if n not in modules]
    if missing:
        raise ConfigError(f"the DSEE pruning names modules this model lacks, e.g. {missing[:3]} (wrong base model)")
    partitioned = any(is_partitioned(modules[n].weight) for n in entries)
    comm = _Comm(partitioned)
    threshold = state.get(f"{PREFIX}other_threshold")
    names = list(entries)
    parts = {n: local_part(modules[n].weight) for n in names}

    # Unstructured rule: ties are pruned in flat order, so each shard needs the ties before it.
    rule = [n for n in names if "ties" in entries[n]]
    tie_offset = {}
    if rule:
        t = int(_bits(threshold.reshape(1).abs())[0])
        local = [int((_bits(parts[n].flat.to(threshold.dtype).abs()) == t).sum()) for n in rule]
        counts = torch.stack(comm.all_gather(torch.tensor(local, dtype=torch.int64)))
        before = torch.cumsum(counts, 0) - counts
        tie_offset = {n: int(before[comm.rank, i]) for i, n in enumerate(rule)}

    counts = torch.zeros(len(names), dtype=torch.int64)
    for i, name in enumerate(names):
        module, entry, p = modules[name], entries[name], parts[name]
        m, n = full_shape(module.weight)
        pos = torch.arange(p.lo, p.lo + p.flat.numel(), device=p.flat.device)
        if "keep_bits" in entry:
            pruned = ~bits_at(entry["keep_bits"].to(p.flat.device), pos)
        elif "ties" in entry:
            b = _bits(p.flat.to(threshold.dtype).abs())
            tb = int(_bits(threshold.reshape(1).abs())[0])
            quota = int(entry["ties"][0]) - tie_offset[name]
            pruned = (b < tb) | _first_true(b == tb, quota)
        else:
            pruned = torch.zeros(p.flat.numel(), dtype=torch.bool, device=p.flat.device)
            if "rows" in entry:
                row_pruned = torch.zeros(m, dtype=torch.bool, device=p.flat.device)
                row_pruned[entry["rows"].to(p.flat.device)] = True
                pruned |= row_pruned[pos // n]
            if "cols" in entry:
                col_pruned = torch.zeros(n, dtype=torch.bool, device=p.flat.device)
                col_pruned[entry["cols"].to(p.flat.device)] = True
                pruned |= col_pruned[pos % n]
        p.flat.masked_fill_(pruned, 0)
        counts[i] = int(pruned.sum())
        if "rows" in entry and getattr(module, "bias", None) is not None:
            bp = local_part(module.bias)
            bpos = torch.arange(bp.lo, bp.lo + bp.flat.numel(), device=bp.flat.device)
            bp.flat.masked_fill_(torch.isin(bpos, entry["rows"].to(bp.flat.device)), 0)
        if isinstance(module, DSEELinear):
            if "keep_bits" in entry:
                module.set_keep(bits=entry["keep_bits"])
            elif "rows" in entry and "cols" not in entry:
                keep = torch.ones(m)
                keep[entry["rows"].to(torch.int64)] = 0
                module.set_keep(rows=keep)
            elif "cols" in entry and "rows" not in entry:
                keep = torch.ones(n)
                keep[entry["cols"].to(torch.int64)] = 0
                module.set_keep(cols=keep)
            else:
                module.set_keep(bits=pack_bits(keep_mask_dense(entry, torch.empty(m, n, device="meta"))))
    counts = comm.all_reduce(counts)
    object.__setattr__(model, STATE_ATTR, {k: v.detach().cpu() for k, v in state.items()})
    return {name: (int(counts[i]), int(full_shape(modules[name].weight).numel())) for i, name in enumerate(names)}


def pruning_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    return getattr(model, STATE_ATTR, None)


# -- reporting -----------------------------------------------------------------------------------
def summarize(model: nn.Module, counts: dict[str, tuple[int, int]], seq_len: int, kind: str) -> dict:
    """Achieved sparsity and the inference FLOPs ratio of the pruned, merged model to the dense one.

    FLOPs per token: ``2 nnz(W)`` for every linear layer (theoretical sparse FLOPs when pruning is
    unstructured; structured pruning removes whole rows/columns, so they are real), plus attention
    scores and weighted values, ``4 x head_dim x active heads x (seq_len + 1) / 2`` per layer
    (causal: a token attends to half the sequence on average). Embedding lookups, norms and
    activations are not counted. The adapters are merged into ``W`` at export: no extra cost.
    """
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or isinstance(m, DSEELinear)]
    dense_linear = sum(2 * int(full_shape(m.weight).numel()) for _, m in linear)
    pruned_total = sum(c for c, _ in counts.values())
    adapted = {n for n, _ in adapted_layers(model)}
    a_pruned = sum(c for n, (c, _) in counts.items() if n in adapted)
    a_total = sum(int(full_shape(m.weight).numel()) for n, m in adapted_layers(model))
    o_pruned = sum(c for n, (c, _) in counts.items() if n not in adapted)
    o_total = sum(t for n, (_, t) in counts.items() if n not in adapted)
    attn = attention_modules(model)
    heads_pruned = 0
    dense_attn = sparse_attn = 0.0
    if attn:
        try:
            heads, _, hd = head_layout(model)
        except ConfigError:
            heads, hd = 0, 0
        state = pruning_state(model) or {}
        per_head = 4 * hd * (seq_len + 1) / 2
        for name, _ in attn:
            gone = int(state[f"{PREFIX}{name}.heads"].numel()) if f"{PREFIX}{name}.heads" in state else 0
            heads_pruned += gone
            dense_attn += per_head * heads
            sparse_attn += per_head * (heads - gone)
    total_params = count_parameters(model)
    base_params = total_params - sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    dense = dense_linear + dense_attn
    return {
        "prune/kind": kind,
        "prune/sparsity_adapted": a_pruned / a_total if a_total else 0.0,
        "prune/sparsity_other": o_pruned / o_total if o_total else 0.0,
        "prune/sparsity_linear": pruned_total / (dense_linear / 2) if dense_linear else 0.0,
        "prune/params_ratio": 1.0 - pruned_total / max(base_params, 1),
        "prune/heads_pruned": heads_pruned,
        "prune/flops_ratio": (dense_linear - 2 * pruned_total + sparse_attn) / dense if dense else 1.0,
        "prune/pruned_entries": pruned_total,
    }
