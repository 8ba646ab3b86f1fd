#!/usr/bin/env bash
# Install everything, then run the linter, the strict docs build (into site/) and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
exec .venv/bin/python -m pytest -q -m "" "$@"  # -m "": every marker, slow and distributed too
