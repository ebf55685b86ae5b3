#!/usr/bin/env bash
# The README's "Baselines" table: every method on SmolLM2-135M, ZsRE 500 (5 turns of 100), one run
# each, one thread, then one table and one plot. Usage: benchmarks/baselines.sh [OUT] [METHOD...]
# (default OUT runs/baselines, methods: ultraedit memit alphaedit grace ft wise). CPU hours, see README.
set -euo pipefail
out=${1:-runs/baselines}
shift || true
methods=${*:-ultraedit memit alphaedit grace ft wise}
data=${ZSRE:-../shared/data/zsre-500.json}
mkdir -p "$out"
for m in $methods; do
  start=$(date +%s)
  OMP_NUM_THREADS=1 ultraedit bench --model smollm2-135m --dataset zsre --data "$data" --skip-invalid \
    --turns 5 --turn-size 100 --method "$m" --device cpu --out "$out/zsre-$m"
  echo "$m wall_s=$(( $(date +%s) - start ))" | tee -a "$out/walls.txt"
done
ultraedit compare "$out"/zsre-* --out "$out"
