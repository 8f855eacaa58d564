#!/usr/bin/env bash
# Sections 1-2 of the benchmark suite (inference and training cost) on one CUDA GPU:
# CUDA-event timing, bf16 autocast, batch 32. Writes BENCHMARKS_GPU.md. Not yet run on a GPU:
# estimated 3-5 minutes on an H100 (budget: under 8). Extra arguments go to denoiserep.bench.
#
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine." >&2
    exit 2
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)' >&2

start=$(date +%s)
"$PY" -m denoiserep.bench --device cuda --dtype bf16 --batch 32 \
    --sections inference training --output BENCHMARKS_GPU.md "$@"
echo "benchmarks/gpu.sh: done in $(( $(date +%s) - start )) s -> BENCHMARKS_GPU.md" >&2
