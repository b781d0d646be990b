#!/usr/bin/env bash
# The wheels the lent GPU machine lacks for scripts/gpu_bench_all.sh, into ./.whl (git-ignored): its
# image has torch, transformers, peft, triton and safetensors, but no deepspeed (nor its pydantic and
# hjson) and no bitsandbytes. Run once on the CPU machine, in the repo's root, with the project's venv
# active (building deepspeed's wheel imports torch). Versions are the project's pins
# (/tmp/base-constraints.txt or constraints.txt where present). bitsandbytes is cut to its CPU and
# CUDA 13 libraries (the image's torch is a cu130 build): 7 MB instead of 43, the device tool carries
# at most 64 MiB a call.
#
# On the GPU machine, start the command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 || exit;
# (TORCH_CUDA_ARCH_LIST=9.0: the machine's "9.0a" is a value DeepSpeed's op builder cannot parse.)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
pin() {  # the pinned version of $1, else $2
  local v
  v=$(grep -ihs "^$1==" /tmp/base-constraints.txt constraints.txt | head -1 | cut -d= -f3)
  echo "${v:-$2}"
}
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(pin deepspeed 0.19.8)" -w .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "hjson==$(pin hjson 3.1.0)" "pydantic==$(pin pydantic 2.14.4)" \
  "pydantic_core==$(pin pydantic_core 2.50.5)" annotated-types typing-inspection \
  "bitsandbytes==$(pin bitsandbytes 0.50.2)"
# Keep libbitsandbytes_cpu and _cuda13x; pip installs a wheel whose RECORD lists removed files.
zip -q -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*' \
  'bitsandbytes/libbitsandbytes_xpu*' || true
ls -la .whl
du -sh .whl
