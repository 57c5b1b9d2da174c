#!/usr/bin/env bash
# Create .venv with pie and its test tools installed; idempotent and quiet on re-runs.
# torch is pinned to the CPU build these machines carry; setup.cfg declares the range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.pie-installed
if [[ ! -f $stamp || setup.cfg -nt $stamp ]]; then
  echo "[setup] installing torch==2.13.0 (CPU) and pie with its test extras"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
  touch "$stamp"
fi
