#!/usr/bin/env bash
# Count the intermittent 2-rank exit abort (issue 22 item 9): run the 2-rank dry run of
# tests/test_multinode.py N times and count runs that exit non-zero or print
# "terminate called". Usage: bash scripts/exit_abort_loop.sh [N=100] [LOG_DIR=runs/exit_abort_loop]
# Each run takes ~20-60 s on 2 shared cores; run it under `nice -n 10` beside other work.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
LOG_DIR=${2:-runs/exit_abort_loop}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$LOG_DIR"
aborts=0 failures=0
for i in $(seq 1 "$N"); do
  log="$LOG_DIR/run_$i.log"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m grailcore.train \
    --run-dir "$LOG_DIR/run" --model.name-or-path micro-llama --model.no-gradient-checkpointing \
    --data.synthetic-n 100 --data.max-history 1 --data.max-train-samples 8 \
    --rollout.max-prompt-tokens 4096 --rollout.max-completion-tokens 8 \
    --grpo.prompts-per-step 2 --grpo.group-size 2 --eval.max-samples 2 \
    --logging.no-tensorboard --dry-run >"$log" 2>&1
  rc=$?
  if grep -q "terminate called" "$log"; then
    aborts=$((aborts + 1))
  elif [ "$rc" -ne 0 ]; then
    failures=$((failures + 1))
  fi
  echo "run $i/$N: exit $rc, aborts so far $aborts, other failures $failures"
done
echo "exit_abort_loop: $N runs, $aborts aborted ('terminate called'), $failures failed otherwise"
[ "$aborts" -eq 0 ] && [ "$failures" -eq 0 ]
