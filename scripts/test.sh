#!/usr/bin/env bash
# Set up (if needed) and run the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
exec python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
