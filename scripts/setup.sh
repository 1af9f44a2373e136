#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system packages, then a virtual environment in
# .venv with the project and its test extras. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
# Debian's Chromium for the browser test (Playwright drives it; no browser download)
[ -x /usr/bin/chromium ] || need_apt+=(chromium chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the builds this project is tested with (CPU is fine; CUDA is used if present).
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
# Label Studio (for the export round-trip test and for reviewing exports) in its own environment: its
# pinned dependencies clash with this project's.
if [ ! -x .venv-ls/bin/label-studio ]; then
  "$PY" -m venv .venv-ls
  .venv-ls/bin/python -m pip install -q --upgrade pip
  .venv-ls/bin/python -m pip install -q "label-studio==1.23.2"
fi
# sentry-sdk 3 removed an option Label Studio 1.23 passes at start-up ("Unknown option 'send_default_pii'")
.venv-ls/bin/python -m pip install -q "sentry-sdk<3"
echo "set-up done: $(python -c 'import lsun_hitl, torch, prefect; print("lsun-hitl", lsun_hitl.__version__, "torch", torch.__version__, "prefect", prefect.__version__)')"
