#!/usr/bin/env bash
# Issue 12's GPU run, one script for an H100/H200 machine (under 10 minutes; results under $OUT, default ./gpu-out):
#   SD1.5 512x512, K = 5: ours vs the official recipe at batch 1 and 4 (s/sample, samples/s, MFU, peak memory),
#   the speed options one at a time, and the full four-reward recipe at batch 1 and 4 (benchmarks/gpu_recipe.py).
# A GPU machine without registry access installs what it lacks from wheels brought along in $WHEELS (default
# .whl/: `pip download diffusers transformers safetensors ... -d .whl` on a machine with access).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
if ! python3 -c "import diffusers, transformers" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "diffusers/transformers missing and no wheels in $WHEELS" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The committed symlink textcraftor_fast/kernels -> ../kernels maps kernels/ into the package (a checkout without
# symlinks gets one here).
[ -e textcraftor_fast/kernels ] || ln -s ../kernels textcraftor_fast/kernels
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/device.txt"
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/gpu_recipe.py --out "$OUT" --only "${SUITES:-step,speed,recipe}" \
  --rounds "${ROUNDS:-3}" 2>&1 | tee "$OUT/gpu_recipe.log"
exit "${PIPESTATUS[0]}"
