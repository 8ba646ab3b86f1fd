#!/usr/bin/env bash
# The main job: install everything, then run `spdecay compare` on its embedded default task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/spdecay compare "$@"
