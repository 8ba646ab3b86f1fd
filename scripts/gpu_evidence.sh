#!/usr/bin/env bash
# GPU scale of the evidence study (issue 9, item 8): `--preset evidence` on all-mpnet-base-v2,
# 3 seeds, on a CUDA machine. Installs into .venv (with the mpnet wheels), then runs the study
# and the GPU step-time benchmark; everything lands in ${OUT:-runs}/gpu-evidence.
# Not run yet: no GPU has been lent to this project's sessions so far.
set -euo pipefail
cd "$(dirname "$0")/.."
SPDECAY_WITH_MPNET=1 bash scripts/setup.sh
DEST=${OUT:-runs}/gpu-evidence
mkdir -p "$DEST"
nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1 || true
.venv/bin/python -m pytest -q -m "" tests/core/test_cuda_triton.py > "$DEST/cuda-tests.txt" 2>&1 || true
/usr/bin/time -v .venv/bin/spdecay compare --preset evidence --device cuda --backbone mpnet \
  --out "$DEST/mpnet" --no-progress "$@" > "$DEST/mpnet.log" 2>&1
.venv/bin/python benchmarks/gpu_step_time.py > "$DEST/gpu_step_time.txt" 2>&1 || true
