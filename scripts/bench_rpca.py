#!/usr/bin/env python
"""DSEE Omega benchmark: how long GreBsmo + top-N selection takes for a model's q and v matrices.

Two modes, each printing a table and writing JSON:

    # One process: N matrices of one shape on one device (a LLaMA-7B model has 64 q/v 4096x4096).
    python scripts/bench_rpca.py matrices --shape 4096x4096 --count 64 --device cuda --out rpca_7b.json

    # The distributed path of a training run: a random-init LLaMA built under ZeRO-3, Omega over
    # all its q and v matrices dealt round-robin to the ranks. Run with 1 and then 2 ranks.
    deepspeed --num_gpus 2 scripts/bench_rpca.py zero3 --hidden 1024 --layers 8 --out rpca_z3_2.json

Random Gaussian weights are the slow case: no low-rank structure, so the rank grows to the cap and
every outer step runs (pretrained weights often stall earlier). Settings are DSEE's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _settings(args):
    from sparse_ft.methods.dsee.omega import RPCASettings

    return RPCASettings(n_sparse=args.n_sparse, rank_cap=args.rank_cap)


def bench_matrices(args) -> dict:
    from sparse_ft.methods.dsee.omega import decompose

    m, n = (int(v) for v in args.shape.lower().split("x"))
    device = torch.device(args.device)
    settings = _settings(args)
    gen = torch.Generator(device=device).manual_seed(0)
    times, errors, ranks = [], [], []
    for i in range(args.count):
        w = (torch.randn(m, n, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, stats = decompose(w, f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj", settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        errors.append(stats["rel_error"])
        ranks.append(stats["rank"])
    # The first matrix pays for lazy initialisation (cuBLAS handles, kernels): report it apart.
    steady = times[1:] or times
    row = {"mode": "matrices", "shape": [m, n], "count": args.count, "device": str(device),
           "threads": torch.get_num_threads(), "total_s": sum(times), "first_s": times[0],
           "median_s": statistics.median(steady), "projected_64_s": statistics.median(steady) * 63 + times[0],
           "rel_error_median": statistics.median(errors), "rank_median": statistics.median(ranks),
           "settings": settings.to_dict()}
    print(f"GreBsmo + top-{settings.n_sparse}, {m}x{n} bf16 random weights on {device} "
          f"({torch.get_num_threads()} threads), {args.count} matrices")
    print(f"{'total s':>9}{'first s':>9}{'median s':>10}{'64 matrices s':>15}{'rel err':>9}{'rank':>6}")
    print(f"{row['total_s']:>9.2f}{row['first_s']:>9.2f}{row['median_s']:>10.3f}{row['projected_64_s']:>15.1f}"
          f"{row['rel_error_median']:>9.4f}{row['rank_median']:>6.0f}")
    return row


def bench_zero3(args) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparse_ft.methods.dsee.omega import compute_omega
    from sparse_ft.training import runtime
    from sparse_ft.training.ds_config import build_ds_config
    from sparse_ft.zero import is_partitioned

    rank, world, _ = runtime.init_distributed()
    ds = build_ds_config("zero3", {}, micro_batch_size=1, grad_accum=1, world_size=world, max_grad_norm=1.0,
                         precision="fp32", hidden_size=args.hidden)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 128), vocab_size=1024)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert is_partitioned(model.get_submodule(names[0]).weight), "model was not partitioned"
    torch.distributed.barrier()
    t0 = time.perf_counter()
    omega, stats = compute_omega(model, names, _settings(args), progress=False)
    torch.distributed.barrier()
    seconds = time.perf_counter() - t0
    row = {"mode": "zero3", "world": world, "threads_per_rank": torch.get_num_threads(), "hidden": args.hidden,
           "layers": args.layers, "matrices": len(names), "seconds": seconds,
           "rel_error_median": statistics.median(s["rel_error"] for s in stats.values()),
           "omega_checksum": int(sum(int(o.sum()) for o in omega.values()))}
    if rank == 0:
        print(f"Omega over {len(names)} q/v matrices ({args.hidden}x{args.hidden}), ZeRO-3, {world} rank(s) x "
              f"{torch.get_num_threads()} thread(s): {seconds:.2f} s; median rel error "
              f"{row['rel_error_median']:.4f}; omega checksum {row['omega_checksum']}")
    return row if rank == 0 else {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher puts it first
    sub = parser.add_subparsers(dest="mode", required=True)
    mats = sub.add_parser("matrices")
    mats.add_argument("--shape", default="4096x4096")
    mats.add_argument("--count", type=int, default=64)
    mats.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    z3 = sub.add_parser("zero3")
    z3.add_argument("--hidden", type=int, default=1024)
    z3.add_argument("--layers", type=int, default=8)
    for p in (mats, z3):
        p.add_argument("--n-sparse", type=int, default=16)
        p.add_argument("--rank-cap", type=int, default=32)
        p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
        p.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row = bench_matrices(args) if args.mode == "matrices" else bench_zero3(args)
    if row and args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
