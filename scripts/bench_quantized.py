#!/usr/bin/env python
"""Peak memory and step time of Random Masking on a bf16 base against an NF4 (bitsandbytes) base.

    python scripts/bench_quantized.py --shape 13b --out docs/results/bench_quantized_13b.json
    python scripts/bench_quantized.py --shape tiny --batch 2 --seq 64 --steps 3 --warmup 1   # CPU smoke run
    python scripts/bench_quantized.py --section op --op-size 1024 --tokens 512               # the two op paths

``--section model`` (default): random init from a LLaMA config (scripts/bench.py's shapes, no
download), Random Masking on ``--density`` of each q and v matrix, gradient checkpointing, batch x
seq tokens, AdamW (or ``--optimizer adamw8bit``) on the values. Row ``bf16`` trains on the bf16
base; row ``nf4`` then quantizes the same weights in place (every linear layer but the head, double
quantization, bf16 compute and storage, as ``model.quantization=nf4`` loads them) and trains again.
Median of ``--steps`` steps after ``--warmup``; peak is ``torch.cuda.max_memory_allocated`` from
the first step on (CPU: the process's peak RSS, which includes building the model).

``--section op``: one (size x size) NF4 layer, forward + backward of the sparse delta by the two
ways that can work on packed weights: ``dequant`` (sparse-ft's: dequantize the layer transiently,
add the values, one matmul) and ``activation`` (the bitsandbytes matmul plus the delta's product on
the activations, ``y[:, rows] += x[:, cols] * v``, a tokens x k intermediate each way).

On CPU everything computes in fp32 (bf16 matmuls are far slower there). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import SHAPES  # noqa: E402  (scripts/bench.py: the same model shapes)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    from sparse_ft.training.runtime import peak_memory_gib

    return peak_memory_gib()


def build_model(shape: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


@torch.no_grad()
def quantize_in_place(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` but ``lm_head`` by a bitsandbytes NF4 layer holding the same weights
    (what ``model.quantization=nf4`` loading produces), one layer at a time."""
    import bitsandbytes as bnb

    from sparse_ft.methods.base import replace_module

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                quant_type="nf4", quant_storage=dtype, device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                       quant_storage=dtype, compress_statistics=True).to(device())
        if old.bias is not None:
            new.bias = old.bias
        replace_module(model, name, new)
        del old
    reset_peak()
    return len(names)


def make_optimizer(name: str, params):
    from sparse_ft.quant import make_optimizer as build

    return build(name, [{"params": params}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def time_training(model, args, label: str) -> dict:
    import sparse_ft
    from sparse_ft.methods.base import replace_module

    sparse_ft.apply(model, sparse_ft.RandomMaskConfig(density=args.density, target_modules=["q_proj", "v_proj"]))
    params = [p for _, p in sparse_ft.trainable_parameters(model)]
    opt = make_optimizer(args.optimizer, params)
    gen = torch.Generator(device=device()).manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=device(), generator=gen)
    reset_peak()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    result = {"row": label, "step_ms": statistics.median(times), "step_ms_min": min(times), "peak_gib": peak_gib(),
              "trainable": sum(p.numel() for p in params), "first_loss": losses[0], "last_loss": losses[-1]}
    # Undo the method so the next row starts from the same base.
    for name, layer in sparse_ft.api.delta_layers(model):
        base = layer.quantized_base
        if base is None:
            base = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            base.weight = layer.weight
        replace_module(model, name, base)
    object.__delattr__(model, sparse_ft.api.CONFIG_ATTR)
    del opt
    reset_peak()
    return result


def section_model(args) -> dict:
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = build_model(args.shape, dtype)
    rows = [time_training(model, args, f"{_name(dtype)} base")]
    print(f"  {rows[-1]['row']:<10} {rows[-1]['step_ms']:9.1f} ms {rows[-1]['peak_gib']:7.2f} GiB", flush=True)
    n = quantize_in_place(model, dtype)
    rows.append(time_training(model, args, f"nf4 base ({n} layers)"))
    print(f"  {rows[-1]['row']:<10} {rows[-1]['step_ms']:9.1f} ms {rows[-1]['peak_gib']:7.2f} GiB", flush=True)
    ref = rows[0]
    print(f"\n{args.shape} LLaMA shape, Random Masking {100 * args.density:g}% of q,v, batch {args.batch} x seq "
          f"{args.seq}, gradient checkpointing, {args.optimizer}, compute {_name(dtype)}, {_device_name()}")
    print(f"{'row':<24} {'trainable':>11} {'step ms':>9} {'x row 1':>7} {'peak GiB':>9}")
    for r in rows:
        r["x_first_row"] = r["step_ms"] / ref["step_ms"]
        print(f"{r['row']:<24} {r['trainable']:>11,} {r['step_ms']:>9.1f} {r['x_first_row']:>7.3f} {r['peak_gib']:>9.2f}")
    return {"section": "model", "shape": args.shape, "batch": args.batch, "seq": args.seq, "density": args.density,
            "optimizer": args.optimizer, "dtype": _name(dtype), "rows": rows}


def section_op(args) -> dict:
    import bitsandbytes as bnb

    from sparse_ft.methods.random_mask.layer import SparseDeltaLinear, sample_indices
    from sparse_ft.quant import base_linear

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    size = args.op_size
    w = torch.randn(size, size) * 0.02
    layer = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, quant_type="nf4", quant_storage=dtype)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=dtype,
                                     compress_statistics=True)
    layer = layer.to(device())
    k = max(1, round(args.density * size * size))
    sparse = SparseDeltaLinear(layer, sample_indices(size * size, k, 0, "op"))
    with torch.no_grad():
        sparse.values.normal_(0, 0.01)
    rows_i, cols_i = sparse.rows.long(), sparse.cols.long()
    x = torch.randn(args.tokens, size, device=device(), dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, size, device=device(), dtype=dtype)

    def dequant_path():
        return sparse(x)

    def activation_path():
        y = base_linear(layer, x, layer.weight, None, True)
        return y.index_add(1, rows_i, x.index_select(1, cols_i) * sparse.values.to(dtype))

    def frozen():
        return base_linear(layer, x, layer.weight, None, True)

    ya, yb = dequant_path(), activation_path()
    agree = (ya - yb).abs().max().item()
    results = []
    for label, fn in (("frozen nf4 layer (dx only)", frozen), ("dequant (sparse-ft)", dequant_path),
                      ("activation scatter", activation_path)):
        times = []
        reset_peak()
        for i in range(args.warmup + args.steps):
            x.grad = None
            sparse.values.grad = None
            sync()
            t0 = time.perf_counter()
            fn().backward(dy)
            sync()
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1000)
        results.append({"row": label, "fwd_bwd_ms": statistics.median(times),
                        "peak_gib": peak_gib() if torch.cuda.is_available() else None})
    print(f"\nNF4 {size}x{size}, {args.tokens} tokens, density {args.density:g} (k = {k:,}), {_name(dtype)}, "
          f"{_device_name()}; paths agree to {agree:.2e}")
    print(f"{'path':<28} {'fwd+bwd ms':>11} {'x frozen':>9}")
    for r in results:
        r["x_frozen"] = r["fwd_bwd_ms"] / results[0]["fwd_bwd_ms"]
        print(f"{r['row']:<28} {r['fwd_bwd_ms']:>11.2f} {r['x_frozen']:>9.2f}")
    return {"section": "op", "size": size, "tokens": args.tokens, "density": args.density, "k": k,
            "dtype": _name(dtype), "max_abs_difference": agree, "rows": results,
            "activation_intermediate_mib": args.tokens * k * torch.finfo(dtype).bits / 8 / 2**20}


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=["model", "op"], default="model")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    parser.add_argument("--density", type=float, default=1e-3, help="fraction of each q and v matrix trained")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--op-size", type=int, default=4096, help="--section op: the layer is size x size")
    parser.add_argument("--tokens", type=int, default=2048, help="--section op: tokens per step (batch x seq)")
    parser.add_argument("--out", default="bench_quantized.json")
    args = parser.parse_args()
    from sparse_ft.quant import bnb_status

    if bnb_status() is not None:
        raise SystemExit(bnb_status())
    result = section_model(args) if args.section == "model" else section_op(args)
    result.update(device=_device_name(), torch=torch.__version__)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
