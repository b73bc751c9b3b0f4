#!/usr/bin/env bash
# The GPU checks and benchmarks in one command (about 5 minutes on one H200), from the repository root:
#
#     benchmarks/gpu.sh                 # writes out/gpu/*.json and prints the table for README
#
# 1. the CUDA-marked tests (CUDA equals CPU, float32 vs float64, no host round trips in the hot loops);
# 2. path_norm / path_magnitude ratios to one float32 forward pass: ResNet-18/50/152 at 224x224;
# 3. exact (and first-order, magnitude, one-path-norm-per-candidate) group scores of ResNet-50: seconds;
# 4. with two or more GPUs, the sharded exact group scores (NCCL, 1 vs 2 processes);
# then the Markdown table. Each step has its own timeout; the first failure stops the script.
# Overrides (for a CPU dry run: DEVICE=cpu SIZE=64 REPEAT=1 GROUP_MODEL=resnet18 benchmarks/gpu.sh):
# PYTHON, OUT, DEVICE, SIZE, REPEAT, MODELS, GROUP_MODEL, and PUBLISHED (a checkout of
# github.com/agonon/pathnorm-pytorch, e.g. carried in out/pathnorm-pytorch: its path-norm and
# path-magnitude are then timed in the same rounds and printed next to ours).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-224}
REPEAT=${REPEAT:-7}
MODELS=${MODELS:-resnet18 resnet50 resnet152}
GROUP_MODEL=${GROUP_MODEL:-resnet50}
PUBLISHED=${PUBLISHED:-}
published=()
[ -n "$PUBLISHED" ] && published=(--published "$PUBLISHED")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
rm -f "$OUT"/*.json

step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

$PYTHON -c "import torch, pathsaliency as ps; gpu = torch.cuda.is_available(); \
print('torch', torch.__version__, '|', ps.__file__, '|', torch.cuda.get_device_name() if gpu else 'no GPU')"
if [ "$DEVICE" = cuda ]; then
  $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'DEVICE=cuda but no GPU is visible')"
fi

step "CUDA-marked tests"
timeout 300 $PYTHON -m pytest -n 0 -q -p no:cacheprovider -m cuda -s tests/test_cuda.py

for m in $MODELS; do
  step "path_norm / path_magnitude: $m at ${SIZE}x${SIZE} on $DEVICE"
  timeout 240 $PYTHON benchmarks/bench_path_norm.py --model "$m" --size "$SIZE" --repeat "$REPEAT" \
    --device "$DEVICE" "${published[@]}" --json "$OUT/norm-$m.json"
done

step "group scores: $GROUP_MODEL at ${SIZE}x${SIZE} on $DEVICE"
timeout 300 $PYTHON benchmarks/bench_group_scores.py --models "$GROUP_MODEL" --size "$SIZE" --device "$DEVICE" \
  --json "$OUT/groups.json"

GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
  step "sharded exact group scores: $GROUP_MODEL, 1 vs 2 GPUs (NCCL)"
  timeout 300 $PYTHON benchmarks/bench_sharded_group_scores.py --models "$GROUP_MODEL" --size "$SIZE" \
    --device cuda --runs 1x1 2x1 --json "$OUT/sharded.json"
else
  echo; echo "(sharding needs two GPUs on the NCCL path: skipped; the CPU figures come from Gloo)"
fi

step "table for README"
$PYTHON benchmarks/readme_table.py "$OUT"
