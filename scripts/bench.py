#!/usr/bin/env python
"""Step time and peak memory of sparse-ft methods against a frozen floor and PEFT LoRA, on one GPU.

    python scripts/bench.py --shape 7b --rows floor,lora,rm:1e-3,rm:1e-4 --out bench_7b.json
    python scripts/bench.py --shape 7b --zero 3 --rows lora,rm:1e-3 --out bench_7b_z3.json

Random init from a LLaMA config (no download), bf16, batch x seq tokens, q and v targeted. Every row
runs in the same process on the same base weights: the method is applied, timed (median of
``--steps`` optimizer steps after ``--warmup``), and removed again. Rows:

- ``floor``: forward + backward for activation gradients only (no weight gradient, no optimizer);
- ``lora``: PEFT LoRA r=8, alpha 16 (the baseline users know), AdamW;
- ``rm:<density>``: sparse-ft Random Masking at that density per matrix, AdamW on the values;
- ``naive:<density>``: the merge-in-autograd baseline of DESIGN.md section 6 (W + scatter(v), the
  merged weight saved for backward), for reference;
- ``dsee``: DSEE with its defaults (r 16, 16 RPCA positions per matrix; the RPCA runs when the row
  is set up and is not timed), first stage;
- ``propetl:lora`` / ``propetl:adapter``: ProPETL with its defaults;
- ``loreml1``: LoReML stage 1 (r 16); ``loreml2:<rho>``: LoReML stage 2 on the top ``rho`` of a
  random ``U V`` with ``alpha2`` = 8 folded into the weights (the shape of a real stage 2).

``--device cpu`` runs the same rows on the CPU in fp32 (to try the script; CPU timings say nothing
about the GPU targets, and peak memory is not measured there), ``--zero 3`` included. Each row also
records ``setup_s``, the untimed time to apply its method (for ``dsee``: mostly the RPCA of Omega). ``--png`` draws step time and peak
memory per row.

With ``--zero 3`` the model is built under ``deepspeed.zero.Init`` and trained through a ZeRO-3
engine on one GPU (``--ds-overrides`` takes JSON merged into ds_configs/zero3.json). Prints a table
and writes JSON; it asserts nothing (targets are read off the table).
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

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}


class NaiveSparse(nn.Module):
    """W + scatter(values) inside autograd: the merged weight is saved for backward."""

    def __init__(self, base: nn.Linear, idx: torch.Tensor):
        super().__init__()
        self.base, self.idx = base, idx.long()
        self.values = nn.Parameter(torch.zeros(idx.numel(), device=base.weight.device))

    def forward(self, x):
        w = self.base.weight.reshape(-1).index_add(0, self.idx, self.values.to(x.dtype)).view_as(self.base.weight)
        return nn.functional.linear(x, w, self.base.bias)


def build_model(shape: str, zero: int, ds_config: dict | None, device: str = "cuda"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    if zero == 3:
        import deepspeed
        from transformers import LlamaForCausalLM  # noqa: F401

        # The model's module imported first: importing it (and torch._dynamo through it) inside
        # zero.Init, which patches tensor construction, fails on recent torch.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    else:
        # fp32 on the CPU: bf16 matmuls there are far slower than fp32 ones.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    # Activation gradients all the way down, in every row (the floor has no trainable weight).
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    return model


def _snapshot(model: nn.Module):
    """Every module's children, parameters and buffers, so a row can be undone whatever it added."""
    return [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), dict(m.__dict__))
            for m in model.modules()]


def _restore(snapshot) -> None:
    for m, modules, params, buffers, attrs in snapshot:
        m._modules.clear()
        m._modules.update(modules)
        m._parameters.clear()
        m._parameters.update(params)
        m._buffers.clear()
        m._buffers.update(buffers)
        for key in [k for k in m.__dict__ if k not in attrs]:
            del m.__dict__[key]


def apply_row(model, row: str):
    """Apply the row's method; return (model to call, undo function, description)."""
    import sparse_ft
    from sparse_ft.methods.base import replace_module

    if row == "floor":
        return model, lambda: None, "frozen floor"
    if row == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        return peft_model, lambda: peft_model.unload(), "PEFT LoRA r=8 q,v"
    device = next(model.parameters()).device
    kind, _, arg = row.partition(":")
    snapshot = _snapshot(model)
    undo = lambda: _restore(snapshot)  # noqa: E731
    if kind == "rm":
        density = float(arg)
        sparse_ft.apply(model, sparse_ft.RandomMaskConfig(density=density, target_modules=["q_proj", "v_proj"]))
        return model, undo, f"Random Masking {100 * density:g}% of q,v"
    if kind == "dsee":
        sparse_ft.apply(model, sparse_ft.DSEEConfig())
        return model, undo, "DSEE r=16 + 16 RPCA entries q,v"
    if kind == "propetl":
        prototype = arg or "lora"
        sparse_ft.apply(model, sparse_ft.ProPETLConfig(prototype=prototype))
        return model, undo, f"ProPETL {prototype} (defaults)"
    if kind == "loreml1":
        sparse_ft.apply(model, sparse_ft.LoReMLConfig(r=16, alpha=16))
        return model, undo, "LoReML stage 1 r=16 q,v"
    if kind == "loreml2":
        rho = float(arg)
        # The fold changes the base weights in place: keep them, so later rows see the same model.
        kept = {m.weight: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}

        def undo():
            _restore(snapshot)
            with torch.no_grad():
                for weight, saved in kept.items():
                    weight.copy_(saved)

        cfg = sparse_ft.LoReMLConfig(r=16, alpha=16, rho=rho, alpha2=8.0)
        sparse_ft.apply(model, cfg)
        with torch.no_grad():  # as if stage 1 had trained U
            for _, p in sparse_ft.trainable_parameters(model):
                p.normal_(0, 0.02)
        cfg.to_stage2(model, cfg.stage1_result_of(model))
        return model, undo, f"LoReML stage 2 rho={100 * rho:g}% q,v"
    if kind == "naive":
        from sparse_ft.methods.random_mask import sample_indices

        density = float(arg)
        targets = [(n, m) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        for n, m in targets:
            k = round(density * m.weight.numel())
            replace_module(model, n, NaiveSparse(m, sample_indices(m.weight.numel(), k, 0, n).to(device)))
        return model, undo, f"naive merge {100 * density:g}% of q,v"
    raise SystemExit(f"unknown row {row!r}; allowed: floor, lora, rm:<d>, naive:<d>, dsee, propetl:lora|adapter, "
                     "loreml1, loreml2:<rho>")


def time_row(model, row, args, ds_config):
    t0 = time.perf_counter()
    call, undo, label = apply_row(model, row)
    if args.device == "cuda":
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    params = [p for p in call.parameters() if p.requires_grad]
    engine = None
    cuda = args.device == "cuda"
    fused = {"fused": True} if cuda else {}
    if args.zero == 3 and not params:
        # DeepSpeed's engine without an optimizer refuses backward, and torch's own is refused too.
        print(f"  {label}: skipped under ZeRO-3 (nothing trains; compare with the stage-0 floor)", flush=True)
        undo()
        return None
    if args.zero == 3:
        import deepspeed

        opt = torch.optim.AdamW(params, lr=1e-4, **fused) if params else None
        engine, *_ = deepspeed.initialize(model=call, optimizer=opt, config=ds_config)
        call = engine
    opt = torch.optim.AdamW(params, lr=1e-4, **fused) if params and engine is None else None
    gen = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=args.device,
                        generator=gen)
    gc.collect()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = call(input_ids=ids, labels=ids).loss
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if engine is not None:
        engine.destroy()
    del opt, engine
    undo()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"row": row, "label": label, "step_ms": statistics.median(times), "step_ms_min": min(times),
            "peak_gib": peak, "trainable": n_train, "zero": args.zero, "setup_s": setup_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--rows", default="floor,lora,naive:1e-3,rm:1e-2,rm:1e-3,rm:1e-4,rm:1e-5")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--zero", type=int, choices=[0, 3], default=0)
    parser.add_argument("--ds-overrides", default="{}", help="JSON merged into ds_configs/zero3.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--png", default="", help="also draw step time and peak memory per row here")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()

    ds_config = None
    if args.zero == 3:
        import deepspeed

        from sparse_ft.training.ds_config import build_ds_config
        from sparse_ft.training.runtime import init_distributed

        init_distributed()
        ds_config = build_ds_config("zero3", json.loads(args.ds_overrides), micro_batch_size=args.batch,
                                    grad_accum=1, world_size=1, max_grad_norm=0.0,
                                    precision="bf16" if args.device == "cuda" else "fp32",
                                    hidden_size=SHAPES[args.shape]["hidden_size"])
    model = build_model(args.shape, args.zero, ds_config, args.device)
    results = []
    for row in args.rows.split(","):
        r = time_row(model, row, args, ds_config)
        if r is None:
            continue
        results.append(r)
        print(f"  {r['label']:<34} {r['step_ms']:8.1f} ms  {r['peak_gib']:6.2f} GiB", flush=True)
    floor = next((r for r in results if r["row"] == "floor"), None)
    lora = next((r for r in results if r["row"] == "lora"), None)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (fp32)"
    print(f"\n{args.shape} LLaMA shape, {'bf16' if args.device == 'cuda' else 'fp32'}, batch {args.batch} x seq "
          f"{args.seq}, ZeRO stage {args.zero}, {device_name}")
    print(f"{'row':<34} {'trainable':>12} {'step ms':>9} {'x floor':>8} {'x LoRA':>7} {'peak GiB':>9} {'vs floor':>9}")
    for r in results:
        xf = r["step_ms"] / floor["step_ms"] if floor else float("nan")
        xl = r["step_ms"] / lora["step_ms"] if lora else float("nan")
        dm = r["peak_gib"] - floor["peak_gib"] if floor else float("nan")
        r.update(x_floor=xf, x_lora=xl, peak_minus_floor_gib=dm)
        print(f"{r['label']:<34} {r['trainable']:>12,} {r['step_ms']:>9.1f} {xf:>8.3f} {xl:>7.3f} "
              f"{r['peak_gib']:>9.2f} {dm:>+9.2f}")
    from sparse_ft.ops import crossover

    out = {"device": device_name, "shape": args.shape, "batch": args.batch, "seq": args.seq,
           "zero": args.zero, "rows": results, "sddmm_choices": dict(crossover._memory),
           "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(out, indent=1))
    if args.png:
        plot(out, args.png)
    return 0


def plot(out: dict, path: str) -> None:
    """Two horizontal bar charts, one bar per row: step time (x floor) and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    axes[0].barh(labels, [r["step_ms"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("step time (ms, median)")
    axes[1].barh(labels, [r["peak_gib"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("peak memory (GiB)")
    axes[0].invert_yaxis()
    fig.suptitle(f"LLaMA-{out['shape']} shape, batch {out['batch']} x seq {out['seq']}, ZeRO {out['zero']}, "
                 f"{out['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
