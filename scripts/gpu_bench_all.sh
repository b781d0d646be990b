#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md's tables, in one go (about 6 minutes on one
# H100, more with the methods, rpca and quant parts, which have not been run yet). Writes JSON (and
# PNG plots) under $OUT (default ./bench_out) and prints every table.
#   bash scripts/gpu_bench_all.sh            # all
#   PARTS="sddmm 7b" bash scripts/gpu_bench_all.sh
set -u
out=${OUT:-bench_out}
parts=${PARTS:-"test sddmm 7b methods 13b z3 rpca quant"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() { echo "== $*"; timeout 300 "$@" 2>&1 | grep -v -i "warn" | tail -${TAIL:-14}; }
has() { [[ " $parts " == *" $1 "* ]]; }
has test && TAIL=4 run python -m pytest -q -p no:cacheprovider tests/ops -k "triton or cuda"
has sddmm && TAIL=12 run python scripts/bench_sddmm.py --out "$out/sddmm.json"
has 7b && TAIL=11 run python scripts/bench.py --shape 7b --steps 20 --rows floor,lora,naive:1e-3,rm:1e-2,rm:1e-3,rm:1e-4,rm:1e-5 --out "$out/bench_7b.json"
has methods && TAIL=8 run python scripts/bench.py --shape 7b --steps 20 --rows floor,lora,rm:1e-3,dsee,loreml2:5e-3,propetl:lora,propetl:adapter --out "$out/bench_7b_methods.json" --png "$out/bench_7b_methods.png"
has 13b && TAIL=8 run python scripts/bench.py --shape 13b --steps 15 --rows floor,lora,rm:1e-2,rm:1e-3 --out "$out/bench_13b.json"
has z3 && TAIL=5 run python scripts/bench.py --shape 7b --zero 3 --rows rm:1e-3 --out "$out/bench_7b_z3_default.json"
has z3 && TAIL=5 run python scripts/bench.py --shape 7b --zero 3 --rows rm:1e-3 --out "$out/bench_7b_z3_tuned.json" \
  --ds-overrides '{"zero_optimization": {"overlap_comm": true, "stage3_prefetch_bucket_size": 5e8, "stage3_max_live_parameters": 3e9, "stage3_max_reuse_distance": 3e9}}'
has z3 && TAIL=5 run python scripts/bench.py --shape 7b --zero 3 --rows floor,lora,rm:1e-3 --out "$out/bench_7b_z3_rows.json" --png "$out/bench_7b_z3.png"
has rpca && TAIL=4 run python scripts/bench_rpca.py matrices --shape 4096x4096 --count 64 --device cuda --out "$out/rpca_7b.json"
has quant && TAIL=8 run python scripts/bench_quantized.py --shape 13b --out "$out/quantized_13b.json"
exit 0
