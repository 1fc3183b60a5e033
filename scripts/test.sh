#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (arguments pass through).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# Two pytest workers (K2_TEST_WORKERS; 0 runs in this process): most tests wait on
# one-threaded training subprocesses, PostgreSQL or Slurm, so two share the 2 cores
# well (the suite took 12.8 min against about 26 in one process). Each test module
# stays on one worker (--dist loadscope): its module fixtures, a Slurm cluster among
# them, are built once.
workers="${K2_TEST_WORKERS:-2}"
if [[ "$workers" == 0 ]]; then
  exec "${K2_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
fi
exec "${K2_VENV:-$root/.venv}/bin/python" -m pytest -q -n "$workers" --dist loadscope "$@"
