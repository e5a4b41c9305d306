#!/usr/bin/env bash
# The one prepared GPU run for the Triton kernels, on the lent device machine (results under $OUT):
#   1. tests/kernels + tests/test_ops.py compiled for the GPU (the small shapes and the full SD shapes, bf16);
#   2. benchmarks/run_gpu.py: each kernel vs torch eager / SDPA, and one SD1.5 512x512 step triton vs torch.
# The machine has torch + Triton but no registry: diffusers travels as wheels in .whl/ (see benchmarks/README.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The committed symlink textcraftor_fast/kernels -> ../kernels maps kernels/ into the package (a checkout without
# symlinks gets one here).
[ -e textcraftor_fast/kernels ] || ln -s ../kernels textcraftor_fast/kernels
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/device.txt"
# -n 8: Triton compiles each kernel variant on the CPU; pytest-xdist (on the image) spreads that over cores.
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 ${TESTS:-tests/kernels tests/test_ops.py} \
  > "$OUT/pytest-gpu.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest-gpu.log" | tail -15
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/run_gpu.py --out "$OUT" --only "${SUITES:-groupnorm,attention,geglu,sweep,step,step4}"
