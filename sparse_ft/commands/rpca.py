"""``sparse-ft rpca``: precompute DSEE's sparse positions Omega into a file for ``method.omega_file``.

A command, so it sits at the top of the package: it reads configs, base checkpoints (through the
export's shard readers) and models; the decomposition itself is :mod:`sparse_ft.methods.dsee.omega`.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..config import ModelConfig, load_config
from ..errors import ConfigError
from ..export import _base_prefix, _layer_keys, base_weight_files, resolve_base_dir
from ..methods.base import count_parameters, find_targets
from ..methods.dsee.omega import RPCASettings, compute_omega, decompose, write_omega_file
from ..methods.fingerprint import _sample_positions, fingerprint
from ..training.model import load_model, meta_model

logger = logging.getLogger("sparse_ft")


def _stream_targets(base_dir: Path, names: list[str], dtype: torch.dtype | None):
    """Yield (name, tensor) of each target matrix, read one at a time from the checkpoint shards."""
    files = base_weight_files(base_dir)
    key_file: dict[str, Path] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                key_file.update({k: f for k in h.keys()})
        else:
            key_file.update({k: f for k in torch.load(f, map_location="cpu", mmap=True, weights_only=True)})
    mapping = _layer_keys(set(names), list(key_file), _base_prefix(base_dir))
    by_name = {v[:-len(".weight")]: k for k, v in mapping.items()}
    loaded_bin: dict[Path, dict] = {}
    for name in names:
        key = by_name[name]
        f = key_file[key]
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                tensor = h.get_tensor(key)
        else:
            if f not in loaded_bin:
                loaded_bin.clear()
                loaded_bin[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            tensor = loaded_bin[f][key]
        yield name, tensor.to(dtype) if dtype is not None else tensor


def main(argv: list[str] | None = None) -> int:
    """``sparse-ft rpca``: exit code 0, or raises ``ConfigError`` (the caller prints it, exit 2)."""
    d = RPCASettings()
    parser = argparse.ArgumentParser(
        prog="sparse-ft rpca",
        description="Precompute DSEE's sparse positions Omega (GreBsmo RPCA of the pretrained target matrices) "
                    "into a file that method.omega_file can point a training run at.")
    parser.add_argument("--model", help="base model directory or hub id (or take it from --config)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if the model is shipped as GGUF")
    parser.add_argument("--out", required=True, help="output file, e.g. omega.safetensors")
    parser.add_argument("--config", default=None, help="a training config whose model and dsee method settings to use")
    parser.add_argument("--targets", nargs="+", default=None, help="target module names (default q_proj v_proj)")
    parser.add_argument("--n-sparse", type=int, default=None, help=f"positions per matrix (default {d.n_sparse})")
    parser.add_argument("--rank-cap", type=int, default=None, help=f"GreBsmo rank cap (default {d.rank_cap})")
    parser.add_argument("--tau", type=float, default=None, help=f"threshold in units of std(W) (default {d.tau})")
    parser.add_argument("--steps", type=int, default=None, help=f"outer steps (default {d.steps})")
    parser.add_argument("--inner", type=int, default=None, help=f"inner iterations (default {d.inner})")
    parser.add_argument("--dr", type=int, default=None, help=f"rank added per step (default {d.dr})")
    parser.add_argument("--tol", type=float, default=None, help=f"stall tolerance (default {d.tol})")
    parser.add_argument("--seed", type=int, default=None, help=f"seed (default {d.seed})")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="cast the weights to the dtype training loads them in before decomposing (auto: as stored), "
                             "to get exactly the Omega training would compute")
    parser.add_argument("--device", default=None, help="where to decompose (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    model_cfg = ModelConfig(name_or_path=args.model or "", gguf_file=args.gguf_file)
    settings, targets = RPCASettings(), ["q_proj", "v_proj"]
    if args.config:
        # The config may already point method.omega_file at the file this command is about to write.
        run = load_config(args.config, ["method.omega_file=null"])
        if run.method.method != "dsee":
            raise ConfigError(f"--config {args.config}: method.name is {run.method.method!r}, not dsee")
        settings, targets = run.method.rpca_settings(), run.method.target_modules
        if not args.model:
            model_cfg = run.model
    if not model_cfg.name_or_path:
        raise ConfigError("--model is required (or --config with a model section)")
    flags = {"n_sparse": args.n_sparse, "rank_cap": args.rank_cap, "tau": args.tau, "steps": args.steps,
             "inner": args.inner, "dr": args.dr, "tol": args.tol, "seed": args.seed}
    settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
    targets = args.targets or targets
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    meta = meta_model(model_cfg)
    names = [n for n, _ in find_targets(meta, targets, field_name="--targets")]
    base_dir = resolve_base_dir(model_cfg.name_or_path) if not model_cfg.gguf_file else Path(model_cfg.name_or_path)
    t0 = time.perf_counter()
    if not model_cfg.gguf_file and base_weight_files(base_dir):
        omega, stats, matrices = {}, {}, {}
        for name, tensor in tqdm(_stream_targets(base_dir, names, dtype), total=len(names), desc="DSEE RPCA (Omega)",
                                 unit="matrix", dynamic_ncols=True):
            pos = _sample_positions(tensor.numel(), name)
            matrices[name] = {"shape": list(tensor.shape), "sample": tensor.reshape(-1)[pos].float().tolist()}
            omega[name], stats[name] = decompose(tensor.to(device), name, settings)
        fp = {"num_parameters": count_parameters(meta), "matrices": matrices}
    else:
        # GGUF (or no safetensors/bin shards): load the model in memory and run the in-model path.
        model = load_model(model_cfg, dtype or torch.float32).to(device)
        fp = fingerprint(model, names)
        omega, stats = compute_omega(model, names, settings)
    write_omega_file(out, omega, settings, fp, stats, base_model=model_cfg.name_or_path)
    errors = [s["rel_error"] for s in stats.values()]
    logger.info("Omega of %d matrices (%d positions each) in %.1fs, GreBsmo relative error %.3f..%.3f -> %s",
                len(names), settings.n_sparse, time.perf_counter() - t0, min(errors), max(errors), out)
    print(out)
    return 0
