#!/usr/bin/env bash
# The demo: sets up .venv if needed, then
#   1. Krablet ingestion: `krablet.pipeline` submits one shard-writing job per
#      chunk of the shapes world plus an index job that depends on them, to an
#      embedded PostgreSQL in runs/<name>/krablet, and drains them with 2 workers;
#   2. trains the debug model on those shards on CPU;
#   3. scores what it learned against the untrained model.
# Extra arguments are Hydra overrides (e.g. stage.steps=800 name=longer).
# Interrupt it and run it again: finished jobs are not redone and training
# resumes from its last checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
py="${K2_VENV:-$root/.venv}/bin/python"
name=demo
for arg in "$@"; do [[ "$arg" == name=* ]] && name="${arg#name=}"; done
samples="${K2_DEMO_SAMPLES:-9600}"  # 600 steps x batch 16: one epoch
"$py" -m krablet.pipeline --input "shapes:$samples:32" --output "runs/$name/shards" --chunk-size 1200 \
  --resolution 32 --bucket-multiple 16 --pixel-downsample 2 --text-len 24 --workers 2 --run-dir "runs/$name/krablet"
"$py" -m trainer.train experiment=demo "$@"
"$py" -m trainer.evaluate "runs/$name"
