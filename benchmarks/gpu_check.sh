#!/usr/bin/env bash
# One prepared GPU check (for a session that has the device machine): builds the CUDA kernels in
# place against the machine's own torch, runs the op tests (CUDA cases included), then the op
# benchmarks (gae, group_advantages, logprob_entropy, checksum: benchmarks/ops_*.py). Writes logs to $OUT (or ./gpu-out). Meant to finish in a few minutes on an H100.
#   run: bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/machine.txt"
# In place: the device image's torch is not the 2.13.0 pin of pyproject; the kernels only need
# a CUDA torch and nvcc. TORCH_CUDA_ARCH_LIST keeps the build to the card at hand.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 $PY setup.py build_ext --inplace 2>&1 | tail -20 | tee "$OUT/build.txt"
$PY -m megarl.cli info 2>&1 | tee "$OUT/info.txt"
# the weight bridge's checksum first (CUDA kernel bit-exact against the torch reference), so a
# failure elsewhere in tests/ops (-x) cannot hide it; timed below with the other ops
timeout 180 $PY -m pytest -q tests/ops/test_checksum.py 2>&1 | tail -15 | tee "$OUT/checksum_tests.txt"
timeout 300 $PY -m pytest -q -x tests/ops 2>&1 | tail -30 | tee "$OUT/tests.txt"
timeout 300 $PY benchmarks/ops.py 2>&1 | tee "$OUT/ops_gpu.md"
