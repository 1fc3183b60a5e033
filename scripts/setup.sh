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
# torch and torchvision first, as a matching pair (open_clip, for the artifact and
# diversity rewards, needs torchvision, which must be built for the same torch):
# with both present, the other packages pull no other build.
if ! "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" || "$venv/bin/pip" install -q torch torchvision
fi
"$venv/bin/pip" install -q -e "$root[test]"
touch "$stamp"
