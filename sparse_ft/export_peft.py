"""Export a trained delta as a PEFT adapter (``sparse-ft export --format peft``).

The adapter is what ``PeftModel.from_pretrained(base, DIR)`` loads: ``adapter_model.safetensors``
(keys ``base_model.model.<module>.<tensor>``) and ``adapter_config.json`` written from PEFT's own
config class. Each method maps to the PEFT adapter type that holds its update exactly:

- ``lora``, LoReML stage 1 and single-task ProPETL with ``prototype: lora`` -> PEFT LoRA (ProPETL's
  per-layer masked copies ``A*m_A``, ``B*m_B`` of the shared prototype become each layer's A, B);
- ``random_mask`` and LoReML stage 2 -> PEFT Super-Tuning (``SUPERTUNING``): per matrix, flat int32
  positions plus fp32 values scatter-added onto the weight, with an optional low-rank part (LoReML's
  folded ``alpha2 U V``). Unlike SHiRA, whose matrices must hold exactly ``r (m + n)`` entries, its
  count is ``int(m n (1 - sparsity))`` for one ``sparsity``: we pick the largest sparsity that leaves
  every matrix room for its entries and fill the rest with zero-valued positions, so any density is
  held exactly (the padding is logged);
- ``dsee`` without pruning -> Super-Tuning with its low-rank part (``s (B A + P_Omega(S))``: the
  sparse values are stored pre-scaled by ``s``).

DSEE with pruning (it zeroes base weights, also of layers it does not adapt), ProPETL's adapter
prototype (a module after the feed-forward block), multi-task ProPETL and full fine-tuning have no
exact PEFT form: they are refused with a message naming the formats they can take.

peft is only needed to write ``adapter_config.json`` (its config class validates the settings).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch

from .delta import read_delta
from .delta_file import save_safetensors
from .errors import ConfigError
from .export import find_delta

logger = logging.getLogger("sparse_ft")

PREFIX = "base_model.model."


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("--format peft needs the peft package: pip install 'sparse-ft[peft]'") from None
    return peft


def _refuse(what: str, why: str) -> ConfigError:
    return ConfigError(f"--format peft: {what} has no exact PEFT adapter form ({why}); export it with --format hf "
                       "(a merged Hugging Face model) or --format delta (the compact delta for sparse_ft.load_delta)")


def supertuning_sparsity(shapes_k: list[tuple[int, int]]) -> float:
    """The largest ``sparsity`` with ``int(numel * (1 - sparsity)) >= k`` for every ``(numel, k)``:
    PEFT's Super-Tuning gives each matrix ``int(numel * (1 - sparsity))`` entries (its
    ``_num_trainable``); the ones beyond ``k`` are padding at value 0."""
    frac = max(k / numel for numel, k in shapes_k)
    sparsity = max(0.0, 1.0 - frac)
    while sparsity > 0 and any(int(numel * (1 - sparsity)) < k for numel, k in shapes_k):
        sparsity = max(0.0, math.nextafter(sparsity, 0.0))
    return sparsity


def _padded(indices: torch.Tensor, values: torch.Tensor, numel: int, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices``/``values`` grown to ``want`` entries with zero values at the lowest unused positions."""
    indices = indices.to(torch.int64)
    extra = want - indices.numel()
    if extra <= 0:
        return indices.to(torch.int32), values.float()
    used = torch.zeros(numel, dtype=torch.bool)
    used[indices] = True
    free = (~used).nonzero().flatten()[:extra]
    return (torch.cat([indices, free]).to(torch.int32),
            torch.cat([values.float(), torch.zeros(extra, dtype=torch.float32)]))


def _sparse_adapter(layers: dict[str, dict], shapes: dict[str, list[int]], low_rank: dict | None):
    """Super-Tuning tensors and settings from ``{name: {"indices", "values"[, "lora_A", "lora_B"]}}``."""
    pairs = {name: (math.prod(shapes[name]), int(t["indices"].numel())) for name, t in layers.items()}
    sparsity = supertuning_sparsity(list(pairs.values()))
    tensors, padding = {}, 0
    for name, t in layers.items():
        numel, k = pairs[name]
        want = int(numel * (1 - sparsity))
        padding += want - k
        idx, val = _padded(t["indices"], t["values"], numel, want)
        tensors[f"{PREFIX}{name}.supertuning_indices"] = idx
        tensors[f"{PREFIX}{name}.supertuning_values"] = val
        if low_rank is not None:
            tensors[f"{PREFIX}{name}.supertuning_lora_A.weight"] = t["lora_A"].float()
            tensors[f"{PREFIX}{name}.supertuning_lora_B.weight"] = t["lora_B"].float()
    if padding:
        logger.info("PEFT Super-Tuning gives every matrix the same fraction of entries: %d zero-valued entries pad "
                    "the %d trained ones (sparsity %r)", padding, sum(k for _, k in pairs.values()), sparsity)
    settings = {"sparsity": sparsity}
    if low_rank is not None:
        settings.update(low_rank)
    return tensors, settings


def peft_form(method: dict, tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]):
    """``(peft type, settings, adapter tensors)`` holding exactly the delta of ``method`` (its
    ``to_dict()``) with compact tensors ``tensors``; ``shapes`` gives each adapted matrix's shape.
    Raises ConfigError for a method without an exact PEFT form."""
    name = method["name"]

    def with_suffix(suffix: str) -> list[str]:
        return sorted(k[:-len(suffix) - 1] for k in tensors if k.endswith("." + suffix))

    if name == "lora" or (name == "loreml" and not with_suffix("indices")):
        # LoRA, or a LoReML delta from stage 1 (a checkpoint before the stage boundary): (alpha / r) B A.
        names = with_suffix("lora_A")
        out = {}
        for n in names:
            out[f"{PREFIX}{n}.lora_A.weight"] = tensors[f"{n}.lora_A"].float()
            out[f"{PREFIX}{n}.lora_B.weight"] = tensors[f"{n}.lora_B"].float()
        settings = {"r": int(method["r"]), "lora_alpha": float(method["alpha"]),
                    "lora_dropout": float(method.get("dropout", 0.0)), "target_modules": names}
        return "LORA", settings, out
    if name == "random_mask":
        names = with_suffix("values")
        layers = {n: {"indices": tensors[f"{n}.indices"], "values": tensors[f"{n}.values"]} for n in names}
        out, settings = _sparse_adapter(layers, shapes, None)
        return "SUPERTUNING", {**settings, "target_modules": names}, out
    if name == "loreml":
        names = with_suffix("indices")
        alpha2 = float(method["alpha2"])
        layers = {}
        for n in names:
            layers[n] = {"indices": tensors[f"{n}.indices"], "values": tensors[f"{n}.values"]}
            # stage 2: W + alpha2 U V + S; U is (out x r) like LoRA's B, V (r x in) like its A
            layers[n].update(lora_B=tensors[f"{n}.fold_U"], lora_A=tensors[f"{n}.fold_V"])
        low_rank = None
        if alpha2:
            r = int(tensors[f"{names[0]}.fold_U"].shape[1])
            low_rank = {"r": r, "lora_alpha": alpha2 * r}
        out, settings = _sparse_adapter(layers, shapes, low_rank)
        return "SUPERTUNING", {**settings, "target_modules": names}, out
    if name == "dsee":
        if any(k.startswith("dsee_prune.") for k in tensors) or method.get("prune", "none") != "none":
            raise _refuse(f"dsee with method.prune = {method.get('prune')}",
                          "pruning zeroes entries of the base weights, including layers DSEE does not adapt")
        names = with_suffix("lora_A")
        r = int(tensors[f"{names[0]}.lora_A"].shape[0])
        scale = float(method["alpha"]) / r
        layers = {n: {"indices": tensors[f"{n}.indices"], "values": tensors[f"{n}.values"].float() * scale,
                      "lora_A": tensors[f"{n}.lora_A"], "lora_B": tensors[f"{n}.lora_B"]} for n in names}
        out, settings = _sparse_adapter(layers, shapes, {"r": r, "lora_alpha": float(method["alpha"])})
        return "SUPERTUNING", {**settings, "target_modules": names}, out
    if name == "propetl":
        if method.get("prototype") != "lora":
            raise _refuse(f"propetl with method.prototype = {method.get('prototype')}",
                          "its adapter is a non-linear module after the feed-forward block")
        if method.get("tasks"):
            raise _refuse("multi-task propetl", "it holds one model per task; pick one first with "
                          "sparse_ft.methods.propetl.task_delta(src, dst, task), then export that")
        from .methods import config_from_dict
        from .methods.propetl.layer import SHARED_ATTR, unpack_bits

        config = config_from_dict(method)
        names = sorted(config.delta_layer_names(tensors))
        out = {}
        for n in names:
            for t in ("lora_A", "lora_B"):
                proto = tensors[f"{SHARED_ATTR}.prototypes.{config.group_of(n)}.{t}"].float()
                out[f"{PREFIX}{n}.{t}.weight"] = proto * unpack_bits(tensors[f"{n}.mask_{t}"], proto.shape).float()
        return "LORA", {"r": int(method["r"]), "lora_alpha": float(method["alpha"]), "target_modules": names}, out
    if name == "full":
        raise _refuse("full (full fine-tuning)", "every parameter changed; PEFT adapters hold parameter-efficient updates")
    raise _refuse(name, "sparse-ft knows no PEFT adapter type for it")


def _peft_config(peft, peft_type: str, settings: dict, base: str):
    if peft_type == "LORA":
        config = peft.LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"],
                                 lora_dropout=settings.get("lora_dropout", 0.0),
                                 target_modules=settings["target_modules"])
    else:
        config = peft.SupertuningConfig(target_modules=settings["target_modules"], sparsity=settings["sparsity"],
                                        r=settings.get("r"), lora_alpha=settings.get("lora_alpha"))
    config.base_model_name_or_path = base
    config.inference_mode = True
    return config


def export_peft(source: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None,
                overwrite: bool = False, command: str | None = None) -> Path:
    """Write the delta found at ``source`` as a PEFT adapter directory (see the module doc).

    Written under a temporary name beside ``out_dir`` and renamed into place at the end."""
    peft = _require_peft()
    delta_path = find_delta(source)
    tensors, meta = read_delta(delta_path)
    method = meta["method"]
    base = base_model or meta.get("base_model")
    if not base:
        raise ConfigError(f"{delta_path} does not record its base model; pass --base-model")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose another directory or pass --overwrite")
    shapes = {name: m["shape"] for name, m in meta["base_fingerprint"]["matrices"].items()}
    peft_type, settings, adapter = peft_form(method, tensors, shapes)
    config = _peft_config(peft, peft_type, settings, str(base))
    if meta.get("quantization"):
        logger.warning("the delta was trained on a %s-quantized base: load the adapter onto the base quantized the "
                       "same way to get the model that trained", meta["quantization"]["scheme"])

    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    save_safetensors(adapter, tmp_dir / "adapter_model.safetensors",
                     {"format": "pt", "sparse_ft_method": json.dumps(method)})
    config.save_pretrained(str(tmp_dir))
    provenance = {"exported_by": f"sparse-ft {meta.get('sparse_ft_version')}", "delta": str(delta_path),
                  "base_model": str(base), "method": method, "format": "peft", "peft_type": peft_type,
                  "peft_version": peft.__version__}
    (tmp_dir / "sparse_ft_export.json").write_text(json.dumps(provenance, indent=2))
    from .model_card import write_model_card

    write_model_card(tmp_dir, delta_path=delta_path, meta=meta, tensors=tensors, base=str(base), fmt="peft",
                     command=command, peft_type=peft_type)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    logger.info("exported %s as a PEFT %s adapter for %s -> %s", delta_path, peft_type, base, out_dir)
    return out_dir
