"""Per-item lineage: for every input, which curation stage kept or dropped it, with the score and why.

A stage records one row per item it looked at, ``(item, stage, decision, score, reason)``,
in ``krablet_lineage`` on the shard the item's key routes to (the same routing as job
keys, so a lookup reads one shard). Rows are upserted on (item, stage): a stage's job
re-run after its worker died writes the same rows again instead of adding copies, so
every input is accounted for exactly once per stage it reached.

    python -m krablet lineage KEY          # every stage's decision on KEY, in pipeline order
    python -m krablet lineage --summary    # per stage: kept / dropped, by reason

A dropped item is looked at by no later stage: its trail ends at the stage that dropped it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from krablet.queue import connect
from krablet.shards import shard_of

DECISIONS = ("kept", "dropped")

# Created by krablet/schema.py's migration 3.
CREATE = """
CREATE TABLE krablet_lineage (
    item text NOT NULL,
    stage text NOT NULL,
    position integer NOT NULL,
    decision text NOT NULL CHECK (decision IN ('kept', 'dropped')),
    score double precision,
    reason text NOT NULL DEFAULT '',
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (item, stage)
)
"""


@dataclass(frozen=True)
class Decision:
    item: str
    stage: str
    decision: str  # "kept" | "dropped"
    score: float | None = None
    reason: str = ""
    position: int = 0  # the stage's place in its pipeline: orders an item's trail

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise ValueError(f"lineage of {self.item!r} at {self.stage!r}: decision must be one of {DECISIONS}, "
                             f"got {self.decision!r}")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"lineage of {self.item!r} at {self.stage!r}: score must be finite, got {self.score}")


def record(dsns: list[str], decisions: Iterable[Decision], batch: int = 5000) -> int:
    """Upsert `decisions` on the shards their items route to; returns how many were written."""
    by_shard: dict[int, list[Decision]] = {}
    for d in decisions:
        by_shard.setdefault(shard_of(d.item, len(dsns)), []).append(d)
    written = 0
    for shard, rows in sorted(by_shard.items()):
        with connect(dsns[shard], autocommit=False) as conn:
            with conn.cursor() as cur:
                for i in range(0, len(rows), batch):
                    cur.executemany(
                        "INSERT INTO krablet_lineage (item, stage, position, decision, score, reason)"
                        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (item, stage) DO UPDATE SET"
                        " position = EXCLUDED.position, decision = EXCLUDED.decision, score = EXCLUDED.score,"
                        " reason = EXCLUDED.reason, recorded_at = now()",
                        [(d.item, d.stage, d.position, d.decision, d.score, d.reason) for d in rows[i:i + batch]])
            conn.commit()
        written += len(rows)
    return written


def lookup(dsns: list[str], item: str) -> list[Decision]:
    """Every stage's decision on `item`, in pipeline order ([] if no stage saw it)."""
    with connect(dsns[shard_of(item, len(dsns))]) as conn:
        rows = conn.execute("SELECT item, stage, decision, score, reason, position FROM krablet_lineage"
                            " WHERE item = %s ORDER BY position, stage", (item,)).fetchall()
    return [Decision(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


def summary(dsns: list[str], prefix: str = "") -> list[dict]:
    """Per (stage, decision, reason): the item count, over all shards, in pipeline order.
    Reasons are grouped by what precedes their first ':' ("near duplicate: of img7 (cosine
    0.999)" counts as "near duplicate"). `prefix` keeps items whose key starts with it."""
    totals: dict[tuple, int] = {}
    for dsn in dsns:
        with connect(dsn) as conn:
            for position, stage, decision, reason, n in conn.execute(
                    "SELECT position, stage, decision, split_part(reason, ':', 1), count(*) FROM krablet_lineage"
                    " WHERE item LIKE %s GROUP BY 1, 2, 3, 4", (_like_prefix(prefix),)):
                key = (position, stage, decision, reason)
                totals[key] = totals.get(key, 0) + n
    return [{"stage": s, "decision": d, "reason": r, "items": n} for (_, s, d, r), n in sorted(totals.items())]


def dropped_items(dsns: list[str], prefix: str = "") -> dict[str, str]:
    """{item: the stage that dropped it} over all shards."""
    out: dict[str, str] = {}
    for dsn in dsns:
        with connect(dsn) as conn:
            out.update(conn.execute("SELECT item, stage FROM krablet_lineage WHERE decision = 'dropped'"
                                    " AND item LIKE %s", (_like_prefix(prefix),)).fetchall())
    return out


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def format_trail(item: str, trail: list[Decision]) -> str:
    if not trail:
        return f"{item}: no stage recorded a decision on it"
    lines = [item]
    for d in trail:
        score = "" if d.score is None else f" score {d.score:.4g}"
        lines.append(f"  {d.stage:<12} {d.decision:<8}{score}" + (f"  ({d.reason})" if d.reason else ""))
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    if not rows:
        return "no lineage recorded"
    lines = [f"{'stage':<12} {'decision':<8} {'items':>8}  reason"]
    lines += [f"{r['stage']:<12} {r['decision']:<8} {r['items']:>8}  {r['reason']}" for r in rows]
    return "\n".join(lines)
