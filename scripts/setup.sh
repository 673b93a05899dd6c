#!/usr/bin/env bash
# Create .venv (if missing) and install picollm with its test extra.
# With a GPU visible: the normal torch build. Without: the CPU build, pinned by
# constraints/cpu.txt, so pip does not pull several GB of CUDA packages.
# Idempotent: a second run with everything installed takes a couple of seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
stamp=.venv/.picollm-installed
want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import picollm, torch" 2>/dev/null; then
  exit 0
fi
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: no GPU found; installing torch's CPU build (constraints/cpu.txt)"
  constraint=(-c constraints/cpu.txt)
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${constraint[@]}" -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
