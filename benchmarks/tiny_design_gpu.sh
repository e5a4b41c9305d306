#!/usr/bin/env bash
# The tiny-world demo's design search (docs/tiny_world.md, "How the shipped config was chosen"), on the lent GPU
# machine: each candidate config is the robustness sweep (`textcraftor-fast demo --seeds ...`) on the
# VALIDATION split, fine-tuning on the GPU, all candidates in parallel. The test split is never read here.
#   DESIGNS="name|--set a=b --set c=d;name2|..." SEEDS=0,1,2,3,4 EVAL_SEEDS=54 bash benchmarks/tiny_design_gpu.sh
# Results: $OUT/designs.tgz holding <name>/{log.txt,sweep.md,sweep.json} (one file: the device returns few). On CPU the same command without train.device=cuda is the slow path.
set -uo pipefail
RES=/tmp/design-results; mkdir -p $RES
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name --format=csv,noheader > "$RES/device.txt"
IFS=';' read -ra designs <<< "$DESIGNS"
for d in "${designs[@]}"; do
  name="${d%%|*}"; sets="${d#*|}"
  mkdir -p "$RES/$name"
  # shellcheck disable=SC2086
  timeout "${RUN_TIMEOUT:-480}" python3 -m textcraftor_fast.cli demo --split validation --seeds "${SEEDS:-0,1,2,3,4}" \
    --eval-seeds "${EVAL_SEEDS:-54}" --out "/tmp/sweep/$name" --set train.device=cuda --set ops.backend=torch \
    --set train.progress_bar=false $sets > "$RES/$name/log.txt" 2>&1 &
done
wait
for d in "${designs[@]}"; do
  name="${d%%|*}"; cp /tmp/sweep/"$name"/sweep.* "$RES/$name/" 2>/dev/null
  echo "== $name"; grep -E "^seed.*(PASS|FAIL)" "$RES/$name/log.txt" | cut -c1-200
done
tar czf "$OUT/designs.tgz" -C "$RES" .
