#!/usr/bin/env bash
# Every editing method on SmolLM2-135M, ZsRE 500 (5 turns of 100), one run each, one thread, then one
# table and one plot (docs/baselines.md). Usage: benchmarks/baselines.sh [OUT] [METHOD...]
# (default OUT runs/baselines, methods: ultraedit memit alphaedit grace ft wise); ZSRE=FILE names the
# data (default $ULTRAEDIT_DATA/zsre-500.json; docs/datasets.md). CPU hours.
set -euo pipefail
out=${1:-runs/baselines}
shift || true
methods=${*:-ultraedit memit alphaedit grace ft wise}
data=${ZSRE:-${ULTRAEDIT_DATA:?set ULTRAEDIT_DATA or ZSRE (docs/datasets.md)}/zsre-500.json}
mkdir -p "$out"
for m in $methods; do
  start=$(date +%s)
  OMP_NUM_THREADS=1 ultraedit bench --model smollm2-135m --dataset zsre --data "$data" --skip-invalid \
    --turns 5 --turn-size 100 --method "$m" --device cpu --out "$out/zsre-$m"
  echo "$m wall_s=$(( $(date +%s) - start ))" | tee -a "$out/walls.txt"
done
ultraedit compare "$out"/zsre-* --out "$out"
