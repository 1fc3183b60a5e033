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


@kind("bad_result", validate=lambda p: require(p, what=str))
def bad_result(payload, ctx):
    """Returns something that is not JSON (a poison result): a set, NaN, bytes or a NUL string."""
    return {"set": {1, 2}, "nan": float("nan"), "bytes": b"\x89PNG", "nul": "a\x00b"}[payload["what"]]


@kind("watch_lease", validate=lambda p: require(p, log=str, seconds=(int, float)))
def watch_lease(payload, ctx):
    """Works for up to `seconds`, stopping early once ctx says the lease was lost; writes what it saw."""
    start = time.monotonic()
    while time.monotonic() - start < payload["seconds"] and not ctx.cancelled():
        time.sleep(0.02)
    with open(payload["log"], "w") as f:
        f.write(f"{ctx.cancelled()} {time.monotonic() - start:.3f}\n")
    return {"cancelled": ctx.cancelled()}
