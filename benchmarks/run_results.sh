#!/usr/bin/env bash
# The runs behind benchmarks/RESULTS.md. Usage: bash benchmarks/run_results.sh mlp|lenet [EPOCHS]
# One thread each; the MLP and LeNet chains can run side by side on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
L0=.venv/bin/l0sparse
chain=$1
if [ "$chain" = mlp ]; then
  epochs=${2:-200}; recipe=recipes/mlp-fashion-mnist.toml; prefix=runs/results/mlp
else
  epochs=${2:-20}; recipe=recipes/lenet5-fashion-mnist.toml; prefix=runs/results/lenet5
fi
run() {  # name, then --set overrides
  local name=$1; shift
  local start=$(date +%s)
  $L0 train "$recipe" --out "$prefix-$name" --force --no-progress --set epochs=$epochs "$@" > "$prefix-$name.log" 2>&1
  echo "{\"run\": \"$prefix-$name\", \"wall_seconds\": $(( $(date +%s) - start ))}" >> runs/results/wall_times.jsonl
}
mkdir -p runs/results
run dense --set regularizer='"none"'
run l0-lambda
run l0-flops10 --set target=0.1
run magnitude-flops10 --set regularizer='"magnitude"' --set target=0.1
