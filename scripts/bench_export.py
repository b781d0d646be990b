#!/usr/bin/env python
"""Export benchmark: time and peak RAM of ``sparse-ft export`` (merge a 0.1% Random Masking delta
into a saved base, write sharded safetensors) next to a plain ``save_pretrained`` of the same model.

    python scripts/bench_export.py --shape 7b --workdir /tmp/bench_export --out export_bench.json

Random init from a LLaMA config, bf16. The base is written once with ``save_pretrained``
(timed: the plain save); the export runs in a child process so its peak resident memory is its own
(its ``VmHWM``); both timings include writing the data to disk (``os.sync``), and the export's
includes starting its process. Prints a table, writes JSON. Needs about 2 x the model size on disk
and, for the plain save, the model in RAM (13.5 GB for 7B).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
    "tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--workdir", default="/tmp/sparse_ft_bench_export")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--out", default="export_bench.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    import sparse_ft

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = LlamaConfig(**SHAPES[args.shape], vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # Both timings run from a clean page cache state to data on disk (os.sync inside the timing):
    # otherwise whichever runs second pays for the first one's write-back.
    os.sync()
    t0 = time.perf_counter()
    model.save_pretrained(str(work / "base"), max_shard_size=args.max_shard_size)
    os.sync()
    save_s = time.perf_counter() - t0
    save_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    sparse_ft.apply(model, sparse_ft.RandomMaskConfig(density=1e-3))
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.normal_(0, 0.01)
    delta = sparse_ft.save_delta(model, work / "run" / "delta.safetensors", base_model=str(work / "base"))
    delta_bytes = delta.stat().st_size
    del model

    # The child reports its own VmHWM: ru_maxrss would carry over this (forking) process's peak.
    child = ("import sys; from sparse_ft.cli import main; rc = main(sys.argv[1:]); "
             "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])); sys.exit(rc)")
    os.sync()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", child, "export", "--checkpoint", str(work / "run"),
                          "--out", str(work / "export"), "--dtype", "bf16", "--max-shard-size", args.max_shard_size],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    os.sync()
    export_s = time.perf_counter() - t0
    export_rss = int(out.stdout.strip().splitlines()[-1]) / 2**20
    shard = max(p.stat().st_size for p in (work / "base").glob("*.safetensors")) / 2**30

    rows = {"shape": args.shape, "base_gib": base_bytes / 2**30, "largest_shard_gib": shard,
            "delta_mib": delta_bytes / 2**20, "save_pretrained_s": save_s, "save_pretrained_peak_rss_gib": save_rss,
            "export_s": export_s, "export_peak_rss_gib": export_rss, "export_over_save": export_s / save_s}
    print(f"LLaMA-{args.shape} shape, bf16, {rows['base_gib']:.1f} GiB in shards of <= {args.max_shard_size}, "
          f"Random Masking 0.1% delta of {rows['delta_mib']:.1f} MiB")
    print(f"{'':<28}{'time s':>8}{'peak RSS GiB':>14}")
    print(f"{'save_pretrained (in memory)':<28}{save_s:>8.1f}{save_rss:>14.2f}")
    print(f"{'sparse-ft export (child)':<28}{export_s:>8.1f}{export_rss:>14.2f}")
    print(f"export / save = {rows['export_over_save']:.2f}x; largest base shard {shard:.2f} GiB")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
