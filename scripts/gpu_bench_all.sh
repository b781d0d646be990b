#!/usr/bin/env bash
# Every GPU measurement of the performance page in one go, side by side on one machine, in priority
# order inside a time budget (the device lease is short): each part writes JSON under $BENCH_OUT
# (default ./bench_out), gets at most its own timeout and what is left of BUDGET_S, and a failing or
# skipped part does not stop the others. At the end scripts/gpu_bench_summary.py writes
# $BENCH_OUT/summary.json (every row against its target) and prints the table; where the device
# tool's $OUT is set, the whole folder also goes there as gpu_bench.tgz, with summary.json and log.txt.
#
#   bash scripts/gpu_bench_all.sh                       # H200/H100: everything, about 8-9 minutes
#   PARTS="7b z3" bash scripts/gpu_bench_all.sh         # some parts
#   SMOKE=1 bash scripts/gpu_bench_all.sh               # CPU: the same parts at the tiny shape
#
# Parts (in run order): 7b (floor, LoRA, Random Masking 1% / 0.1%, DSEE, ProPETL lora/adapter, LoReML
# stage 1 / 2, one process, 7B shape), z3 (ZeRO-3 on one GPU: floor, RM 0.1%; stage 0 is the 7b
# part), quant (13B bf16 vs NF4 base: step and peak memory), 13b (13B floor, RM 1% / 0.1%: memory
# over the floor), rpca (DSEE Omega for the 64 q/v 4096x4096 of 7B), sddmm (the values' gradient
# kernels over densities), test (the GPU kernel tests), z3tuned (ZeRO-3 with prefetch/persistence
# overrides).
set -u
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-bench_out}
parts=${PARTS:-"7b z3 quant 13b rpca sddmm test z3tuned"}
budget=${BUDGET_S:-530}
smoke=${SMOKE:-0}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
log="$out/log.txt"
: > "$log"
has() { [[ " $parts " == *" $1 "* ]]; }

# run NAME TIMEOUT CMD...: at most TIMEOUT seconds and never past the budget; the outcome goes to
# $out/parts.txt (ok, failed rc, timeout, skipped) for the summary.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "== $name: skipped (budget of ${budget}s spent)" | tee -a "$log"
    echo "$name skipped" >> "$out/parts.txt"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, ${left}s of the budget left): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v -i -e "warn" -e "it/s]" >> "$log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  ((rc == 124)) && status=timeout
  ((rc != 0 && rc != 124)) && status="failed_rc$rc"
  echo "$name $status $(($(date +%s) - t0))" >> "$out/parts.txt"
  echo "   $name: $status in $(($(date +%s) - t0))s" | tee -a "$log"
  tail -n "${TAIL:-12}" "$log" | grep -v "^== \|^   [a-z0-9]*: " || true
}

: > "$out/parts.txt"
if [[ $smoke == 1 ]]; then
  # CPU, tiny shapes: every part's code path, nothing measured that means anything.
  B7=(--shape tiny --device cpu --batch 2 --seq 32 --warmup 1 --steps 2)
  B13=("${B7[@]}")
  Q=(--shape tiny --batch 2 --seq 32 --warmup 1 --steps 2)
  R=(--shape 256x256 --count 4 --device cpu)
  Z=(--device cpu)
else
  B7=(--shape 7b --steps 10 --warmup 3)
  B13=(--shape 13b --steps 8 --warmup 2)
  Q=(--shape 13b --steps 8 --warmup 2)
  R=(--shape 4096x4096 --count 64 --device cuda)
  Z=()
fi
{ echo "start $(date -u +%FT%TZ) smoke=$smoke parts=$parts budget=${budget}s"; nproc; uptime
  python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv
} >> "$log" 2>&1

has 7b && run 7b 200 python scripts/bench.py "${B7[@]}" --out "$out/bench_7b.json" \
  --rows floor,lora,rm:1e-2,rm:1e-3,dsee,propetl:lora,propetl:adapter,loreml1,loreml2:5e-3
has z3 && run z3 120 python scripts/bench.py "${B7[@]}" "${Z[@]}" --zero 3 --rows rm:1e-3 --out "$out/bench_7b_z3.json"
has quant && run quant 120 python scripts/bench_quantized.py "${Q[@]}" --out "$out/quantized_13b.json"
has 13b && run 13b 90 python scripts/bench.py "${B13[@]}" --rows floor,rm:1e-2,rm:1e-3 --out "$out/bench_13b.json"
has rpca && run rpca 90 python scripts/bench_rpca.py matrices "${R[@]}" --out "$out/rpca_7b.json"
if [[ $smoke != 1 ]]; then
  has sddmm && run sddmm 60 python scripts/bench_sddmm.py --out "$out/sddmm.json"
fi
has test && run test 90 python -m pytest -q -p no:cacheprovider tests/ops -k "triton or cuda"
has z3tuned && run z3tuned 100 python scripts/bench.py "${B7[@]}" "${Z[@]}" --zero 3 --rows rm:1e-3 \
  --out "$out/bench_7b_z3_tuned.json" --ds-overrides '{"zero_optimization": {"overlap_comm": true,
  "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e6, "stage3_max_live_parameters": 3e9,
  "stage3_max_reuse_distance": 3e9}}'

python scripts/gpu_bench_summary.py "$out" 2>&1 | tee -a "$log"
echo "total $(($(date +%s) - start))s" | tee -a "$log"
if [[ -n ${OUT:-} && -d ${OUT:-} && $(cd "$OUT" && pwd) != $(cd "$out" && pwd) ]]; then
  tar czf "$OUT/gpu_bench.tgz" -C "$out" . && cp "$out/summary.json" "$log" "$OUT/" 2>/dev/null
fi
exit 0
