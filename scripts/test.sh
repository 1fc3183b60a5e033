#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (arguments pass through).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${K2_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
