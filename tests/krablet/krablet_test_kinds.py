"""Job kinds used by the Krablet tests (imported by worker processes with --kinds)."""

import os
import time

from krablet.kinds import kind, require


@kind("tally", validate=lambda p: require(p, log=str))
def tally(payload, ctx):
    """Records each execution (start and end) in a per-process file, so tests
    can count how many times every job actually ran."""
    path = f"{payload['log']}.{os.getpid()}"
    with open(path, "a") as f:
        f.write(f"start {ctx.key} {ctx.owner}\n")
    time.sleep(payload.get("seconds", 0))
    with open(path, "a") as f:
        f.write(f"end {ctx.key} {ctx.owner}\n")
    return {"owner": ctx.owner, "attempt": ctx.attempt}
