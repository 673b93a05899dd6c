#!/usr/bin/env bash
# picollm speedrun: one command from a fresh clone to a trained compute-optimal model.
#   bash speedrun.sh                      # GPU: FineWeb-Edu, 1e18 FLOPs; CPU: stdlib corpus, ~10 min
#   bash speedrun.sh budget.minutes=2     # extra arguments are Hydra overrides for every stage
#   RUN_DIR=runs/mine bash speedrun.sh    # where outputs go (default runs/speedrun-cpu or -gpu);
#   bash speedrun.sh run_dir=runs/mine    # the same, as an override
# Every stage is idempotent: rerunning reuses the prepared data, resumes or skips a
# finished run, and rewrites the evaluation, samples and report.
set -euo pipefail
cd "$(dirname "$0")"

stage() { echo; echo "=== [$(date +%H:%M:%S)] $1"; }
fail() { echo "speedrun: stage '$current' failed (see the message above); fix it and rerun bash speedrun.sh" >&2; }
trap fail ERR

current=setup; stage "setup: virtual environment and packages"
bash scripts/setup.sh
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-disabled}

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  kind=gpu
else
  kind=cpu
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the CPU run is fully offline
fi
# run_dir=X among the arguments wins over RUN_DIR, and every stage uses it.
overrides=()
for arg in "$@"; do
  case "$arg" in
    run_dir=*) RUN_DIR=${arg#run_dir=} ;;
    +run_dir=*|++run_dir=*) echo "speedrun: pass run_dir=DIR (or RUN_DIR=DIR), not $arg" >&2; exit 2 ;;
    *) overrides+=("$arg") ;;
  esac
done
RUN_DIR=${RUN_DIR:-runs/speedrun-$kind}
args=(experiment=speedrun_$kind run_dir="$RUN_DIR" "${overrides[@]}")
times="$RUN_DIR/stage_times.tsv"
mkdir -p "$RUN_DIR"; : > "$times"
timed() {  # run a stage and record its wall clock
  local name=$1; shift; current=$name; stage "$name"
  local t0=$SECONDS; "$@"; printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$times"
}

timed plan     $PY -m picollm.plan "${args[@]}"
timed data     $PY -m picollm.data.prepare "${args[@]}"
timed train    $PY -m picollm.train "${args[@]}"
timed evaluate $PY -m picollm.evaluate run_dir="$RUN_DIR"
timed sample   $PY -m picollm.sample run_dir="$RUN_DIR" prompt="'def '" max_tokens=96 seed=0
timed report   $PY -m picollm.report run_dir="$RUN_DIR" samples=true

trap - ERR
stage "done: $RUN_DIR/report.md"
column -t "$times" 2>/dev/null || cat "$times"
