#!/usr/bin/env bash
# Set up (if needed) and run the demo: the cascade for one Fashion-MNIST category on the embedded
# defaults (a local folder, a Dask LocalCluster, Prefect's local server), with a simulated crowd.
# Extra arguments go to `lsun-hitl demo` (e.g. --category bag --limit 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec lsun-hitl demo "$@"
