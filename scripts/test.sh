#!/usr/bin/env bash
# Install everything, then run the linter, the strict docs build (into site/) and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
# -m "": every marker, slow and distributed too. Two pytest workers, one file each at a time
# (module fixtures stay in one process), one thread each: the 2-core budget is 8 minutes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -m "" -n "${SPDECAY_TEST_WORKERS:-2}" --dist loadfile "$@"
