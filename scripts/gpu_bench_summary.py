#!/usr/bin/env python
"""One table from the JSON that scripts/gpu_bench_all.sh leaves in its folder: every row the
performance targets name, its value, the target (ratios, so they carry over between GPUs) and
whether it is met. Rows whose part did not run (or failed) say so. Writes ``summary.json`` there.

    python scripts/gpu_bench_summary.py bench_out
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def bench_row(data: dict | None, row: str) -> dict | None:
    return next((r for r in data["rows"] if r["row"] == row), None) if data else None


def summarize(folder: Path) -> dict:
    b7, z3 = load(folder, "bench_7b.json"), load(folder, "bench_7b_z3.json")
    z3t, b13 = load(folder, "bench_7b_z3_tuned.json"), load(folder, "bench_13b.json")
    quant, rpca = load(folder, "quantized_13b.json"), load(folder, "rpca_7b.json")
    parts = {}
    for line in (folder / "parts.txt").read_text().splitlines() if (folder / "parts.txt").is_file() else []:
        name, status, *secs = line.split()
        parts[name] = {"status": status, "seconds": int(secs[0]) if secs else None}
    rows = []

    def add(name, value, unit, target=None, met=None, source=None, note=""):
        rows.append({"row": name, "value": value, "unit": unit, "target": target, "met": met, "source": source,
                     "note": note})

    floor7 = bench_row(b7, "floor")
    for key, name in (("floor", "7B frozen floor"), ("lora", "7B PEFT LoRA r=8"), ("rm:1e-2", "7B Random Masking 1%"),
                      ("rm:1e-3", "7B Random Masking 0.1%"), ("dsee", "7B DSEE"), ("propetl:lora", "7B ProPETL lora"),
                      ("propetl:adapter", "7B ProPETL adapter"), ("loreml1", "7B LoReML stage 1"),
                      ("loreml2:5e-3", "7B LoReML stage 2 (0.5%)")):
        r = bench_row(b7, key)
        if r is None:
            add(name, None, "x floor", source="bench_7b.json", note="not measured")
            continue
        ratio = r["step_ms"] / floor7["step_ms"] if floor7 else None
        target = 1.03 if key == "rm:1e-3" else None
        add(f"{name}: step", ratio, "x floor", target, None if target is None or ratio is None else ratio <= target,
            "bench_7b.json", f"{r['step_ms']:.1f} ms, peak {r['peak_gib']:.2f} GiB, setup {r.get('setup_s', 0):.1f} s")
    rm7, rmz = bench_row(b7, "rm:1e-3"), bench_row(z3, "rm:1e-3")
    ratio = rmz["step_ms"] / rm7["step_ms"] if rm7 and rmz else None
    add("ZeRO-3 one GPU / stage 0, RM 0.1% step", ratio, "x", 1.5, None if ratio is None else ratio <= 1.5,
        "bench_7b_z3.json / bench_7b.json", f"{rmz['step_ms']:.1f} ms vs {rm7['step_ms']:.1f} ms" if ratio else "")
    rmt = bench_row(z3t, "rm:1e-3")
    ratio = rmt["step_ms"] / rm7["step_ms"] if rm7 and rmt else None
    add("ZeRO-3 tuned overrides / stage 0, RM 0.1% step", ratio, "x", 1.5, None if ratio is None else ratio <= 1.5,
        "bench_7b_z3_tuned.json / bench_7b.json")
    floor13, rm13 = bench_row(b13, "floor"), bench_row(b13, "rm:1e-2")
    extra = rm13["peak_gib"] - floor13["peak_gib"] if floor13 and rm13 else None
    add("13B RM 1%: peak over the floor", extra, "GiB", 1.0, None if extra is None else extra <= 1.0, "bench_13b.json")
    if rpca:
        # All 64 timed where the part ran in full; else the projection from the matrices it timed.
        value = rpca["total_s"] if rpca["count"] == 64 else rpca["projected_64_s"]
        add("DSEE Omega, 64 q/v 4096x4096 (7B)", value, "s", 60.0, value < 60.0, "rpca_7b.json",
            f"{rpca['count']} matrices of {rpca['shape'][0]}x{rpca['shape'][1]} on {rpca['device']}"
            + ("" if rpca["count"] == 64 else ", projected to 64"))
    else:
        dsee = bench_row(b7, "dsee")
        value = dsee.get("setup_s") if dsee else None
        add("DSEE Omega, 64 q/v 4096x4096 (7B)", value, "s", 60.0, None if value is None else value < 60.0,
            "bench_7b.json (DSEE row's setup)" if value else None, "rpca part missing")
    if quant and len(quant.get("rows", [])) == 2:
        bf16, nf4 = quant["rows"]
        add("13B NF4 base: peak", nf4["peak_gib"], "GiB", 16.0, nf4["peak_gib"] <= 16.0, "quantized_13b.json")
        ratio = nf4["step_ms"] / bf16["step_ms"]
        add("13B NF4 / bf16 base: step", ratio, "x", 1.5, ratio <= 1.5, "quantized_13b.json",
            f"{nf4['step_ms']:.1f} ms vs {bf16['step_ms']:.1f} ms; bf16 peak {bf16['peak_gib']:.2f} GiB")
    else:
        add("13B NF4 base: peak", None, "GiB", 16.0, None, None, "not measured")
        add("13B NF4 / bf16 base: step", None, "x", 1.5, None, None, "not measured")
    device = next((d["device"] for d in (b7, z3, b13, quant) if d and d.get("device")), None)
    return {"device": device, "parts": parts, "rows": rows}


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out")
    summary = summarize(folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nGPU benchmarks on {summary['device']}; parts: "
          + ", ".join(f"{k} {v['status']}" + (f" {v['seconds']}s" if v["seconds"] is not None else "")
                      for k, v in summary["parts"].items()))
    print(f"{'row':<48}{'value':>10} {'unit':<8}{'target':>8}  met")
    for r in summary["rows"]:
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        target = "" if r["target"] is None else f"{r['target']:g}"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        print(f"{r['row']:<48}{value:>10} {r['unit']:<8}{target:>8}  {met:<4} {r['note']}")
    print(f"wrote {folder / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
