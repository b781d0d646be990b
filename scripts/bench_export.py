#!/usr/bin/env python
"""Export benchmark: time and peak RAM of ``sparse-ft export`` (merge a 0.1% Random Masking delta
into a saved base, write sharded safetensors) next to a plain ``save_pretrained`` of the same model
and a plain file copy of the base's shards (``cp``: the floor any export pays), in one run.

    python scripts/bench_export.py --shape 7b --workdir /tmp/bench_export --out export_bench.json

Random init from a LLaMA config, bf16. The base is written once with ``save_pretrained``
(timed: the plain save); the exports run in a child process so their peak resident memory is their
own (``VmHWM``); every timing includes writing the data to disk (``os.sync``), and the exports'
include starting their process. Two exports: the current one (untouched tensors copied as bytes)
and the earlier path that decodes and re-encodes every tensor (``_BYTE_COPY = False``); the bench
checks that a sample of tensors (every adapted one, every 8th other one) is byte-identical in both.
Prints a table, writes JSON. Needs about 2 x the model size on disk (each copy is deleted once
measured) and, for the plain save, the model in RAM (13.5 GB for 7B).
"""
from __future__ import annotations

import argparse
import hashlib
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
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return run(args, work)
    finally:  # tens of GB: never left behind, whatever happened
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import sparse_ft

    config = LlamaConfig(**SHAPES[args.shape], vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # Every timing runs from a clean page cache state to data on disk (os.sync inside the timing):
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
    def export(out: Path, byte_copy: bool) -> tuple[float, float]:
        child = (f"import sys; import sparse_ft.export as e; e._BYTE_COPY = {byte_copy}; "
                 "from sparse_ft.cli import main; rc = main(sys.argv[1:]); "
                 "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])); sys.exit(rc)")
        os.sync()
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", child, "export", "--checkpoint", str(work / "run"), "--out",
                              str(out), "--dtype", "bf16", "--max-shard-size", args.max_shard_size],
                             cwd=ROOT, capture_output=True, text=True)
        os.sync()
        seconds = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"export failed:\n{res.stderr[-3000:]}")
        return seconds, int(res.stdout.strip().splitlines()[-1]) / 2**20

    # The floor: the base's shards copied file to file, nothing decoded.
    (work / "floor").mkdir()
    shards = sorted((work / "base").glob("*.safetensors"))
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, shards), str(work / "floor")], check=True)
    os.sync()
    cp_s = time.perf_counter() - t0
    shutil.rmtree(work / "floor")

    export_s, export_rss = export(work / "export", True)
    sample = sample_sums(work / "export")
    shutil.rmtree(work / "export")
    old_s, old_rss = export(work / "export_old", False)
    old_sample = sample_sums(work / "export_old")
    shutil.rmtree(work / "export_old")
    differ = sorted(k for k in sample if sample[k] != old_sample.get(k))
    adapted = sum(k.endswith(("q_proj.weight", "v_proj.weight")) for k in sample)
    shard = max(p.stat().st_size for p in shards) / 2**30
    load = os.getloadavg()

    rows = {"shape": args.shape, "base_gib": base_bytes / 2**30, "largest_shard_gib": shard,
            "delta_mib": delta_bytes / 2**20, "save_pretrained_s": save_s, "save_pretrained_peak_rss_gib": save_rss,
            "cp_s": cp_s, "export_s": export_s, "export_peak_rss_gib": export_rss,
            "export_decode_all_s": old_s, "export_decode_all_peak_rss_gib": old_rss,
            "export_over_save": export_s / save_s, "export_over_cp": export_s / cp_s,
            "sampled_tensors": len(sample), "sampled_adapted": adapted, "sampled_differ": differ,
            "loadavg_1_5_15_at_end": load, "cpus": os.cpu_count()}
    print(f"LLaMA-{args.shape} shape, bf16, {rows['base_gib']:.1f} GiB in shards of <= {args.max_shard_size}, "
          f"Random Masking 0.1% delta of {rows['delta_mib']:.1f} MiB")
    print(f"{'':<38}{'time s':>8}{'peak RSS GiB':>14}")
    print(f"{'save_pretrained (in memory)':<38}{save_s:>8.1f}{save_rss:>14.2f}")
    print(f"{'cp of the base shards (floor)':<38}{cp_s:>8.1f}{'':>14}")
    print(f"{'sparse-ft export (child)':<38}{export_s:>8.1f}{export_rss:>14.2f}")
    print(f"{'export, every tensor decoded (before)':<38}{old_s:>8.1f}{old_rss:>14.2f}")
    print(f"export / save = {rows['export_over_save']:.2f}x, export / cp = {rows['export_over_cp']:.2f}x; "
          f"largest base shard {shard:.2f} GiB; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{len(sample)} sampled tensors ({adapted} adapted) byte-identical in both exports: {not differ}")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 1 if differ else 0


def sample_sums(out: Path) -> dict[str, str]:
    """sha256 of the bytes of every adapted tensor and of every 8th other one, by key."""
    sums = {}
    for path in sorted(out.glob("*.safetensors")):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
            for i, ((begin, end), key) in enumerate(entries):
                if i % 8 and not key.endswith(("q_proj.weight", "v_proj.weight")):
                    continue
                f.seek(8 + n + begin)
                sums[key] = hashlib.sha256(f.read(end - begin)).hexdigest()
    return sums


if __name__ == "__main__":
    sys.exit(main())
