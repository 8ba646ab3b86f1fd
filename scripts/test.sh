#!/usr/bin/env bash
# Install everything, then run the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
exec .venv/bin/python -m pytest -q "$@"
