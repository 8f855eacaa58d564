#!/usr/bin/env bash
# The CUDA checks (benchmarks/cuda_check.py); the training step eager and compiled at batch 8 and 32
# in bf16, and the DenoiseRep⁻ sampler eager and compiled (benchmarks/gpu_step.py, written to
# BENCHMARKS_GPU_STEP.md); then the benchmark suite's cost sections on one CUDA GPU: CUDA-event
# timing, bf16 autocast; training at batch 8 and 32, inference at 32. One bench run per section, most
# wanted first (training, calibration, inference), all writing BENCHMARKS_GPU.md (a later run keeps
# the sections an earlier one wrote), each inside what is left of GPU_BUDGET_S seconds (default 540),
# so a lease that ends early still leaves the finished sections. (§2b, the operators a step
# dispatches, is hardware-independent: BENCHMARKS.md has it from the CPU.)
# Extra arguments go to denoiserep.bench.
#
#   bash benchmarks/gpu.sh                     # writes BENCHMARKS_GPU.md and BENCHMARKS_GPU_STEP.md
#   OUTPUT=/tmp/gpu.md GPU_BUDGET_S=900 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUTPUT=${OUTPUT:-BENCHMARKS_GPU.md}
# Without an installed package (a bare GPU machine), run it from the checkout.
"$PY" -c 'import denoiserep' 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine." >&2
    exit 2
fi
"$PY" -c 'import torch, timm; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| timm", timm.__version__)' >&2

start=$(date +%s)
deadline=$(( start + ${GPU_BUDGET_S:-540} ))
status=0
# First what the CPU tests cannot check: calibration, fusion and both training paths on CUDA.
"$PY" benchmarks/cuda_check.py || status=1
left=$(( deadline - $(date +%s) ))
echo "benchmarks/gpu.sh: the training step, eager and compiled (${left} s left)" >&2
timeout "$left" "$PY" benchmarks/gpu_step.py --output "${OUTPUT%.md}_STEP.md" || status=1
for section in training calibration inference; do
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -le 30 ]; then
        echo "benchmarks/gpu.sh: no time left for section $section" >&2
        status=1
        continue
    fi
    echo "benchmarks/gpu.sh: section $section (${left} s left)" >&2
    if ! timeout "$left" "$PY" -m denoiserep.bench --device cuda --dtype bf16 --sections "$section" --output "$OUTPUT" "$@"; then
        echo "benchmarks/gpu.sh: section $section failed or ran out of time" >&2
        status=1
    fi
done
echo "benchmarks/gpu.sh: done in $(( $(date +%s) - start )) s -> $OUTPUT" >&2
exit $status
