#!/usr/bin/env bash
# Creates .venv with k2train and its dependencies. Idempotent: a second run only
# checks that the environment still imports.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${K2_VENV:-$root/.venv}"
stamp="$venv/.k2train-installed"
if [[ -f "$stamp" && "$stamp" -nt "$root/pyproject.toml" ]]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
# A CPU build of torch first: with torch already present, the other packages do
# not pull the multi-GB CUDA build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/pip" install -q "torch==2.13.0" || "$venv/bin/pip" install -q torch
fi
"$venv/bin/pip" install -q -e "$root[test]"
touch "$stamp"
