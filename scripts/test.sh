#!/usr/bin/env bash
# The one command that runs the test suite: sets up .venv if needed, then pytest with one
# worker per core (pytest-xdist; each test file stays on one worker, so a file's shared
# fixtures are built once). Extra arguments go to pytest and win over these, e.g.
# `bash scripts/test.sh -m "not slow" -x`, or `-n 0` for one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
