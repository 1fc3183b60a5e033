#!/usr/bin/env bash
# The demo: sets up .venv if needed, trains the debug model on the shapes world
# on CPU, then scores what it learned against the untrained model. Extra
# arguments are Hydra overrides (e.g. stage.steps=800 name=longer).
# Interrupt it and run it again: it resumes from its last checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
py="${K2_VENV:-$root/.venv}/bin/python"
name=demo
for arg in "$@"; do [[ "$arg" == name=* ]] && name="${arg#name=}"; done
"$py" -m trainer.train experiment=demo "$@"
"$py" -m trainer.evaluate "runs/$name"
