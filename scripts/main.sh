#!/usr/bin/env bash
# The main job: install everything (once: scripts/setup.sh skips what is already installed), then
# run `spdecay compare` on its embedded default task. Any `spdecay compare` option can be appended.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/spdecay compare "$@"
