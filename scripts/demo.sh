#!/usr/bin/env bash
# The demo: sets up .venv if needed, trains the debug model on the shapes world
# on CPU and reports what it learned. Extra arguments are Hydra overrides.
# Interrupt it and run it again: it resumes from its last checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
py="${K2_VENV:-$root/.venv}/bin/python"
"$py" -m trainer.train experiment=demo "$@"
