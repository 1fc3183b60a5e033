"""Lineage: each stage's decision on each input, on the shard its key routes to, upserted
so a re-run job does not add copies; queried by key and summarised per stage."""

import json

import pytest

from krablet import cli
from krablet.lineage import Decision, dropped_items, lookup, record, summary
from krablet.shards import shard_of


def test_decisions_route_by_key_upsert_on_rerun_and_summarise(make_shards, capsys):
    dsns = make_shards(2)
    items = [f"img{i:03d}" for i in range(40)]
    assert {shard_of(k, 2) for k in items} == {0, 1}  # both shards hold some
    first = [Decision(k, "validate", "kept", position=0) for k in items]
    first += [Decision(k, "synthetic", "dropped" if i % 10 == 0 else "kept", 0.9 if i % 10 == 0 else 0.1,
                       "probe: looks generated" if i % 10 == 0 else "", 1) for i, k in enumerate(items)]
    assert record(dsns, first) == 80
    assert record(dsns, first) == 80  # the job re-run after its worker died: same rows, no copies
    rows = {(r["stage"], r["decision"], r["reason"]): r["items"] for r in summary(dsns)}
    assert rows == {("validate", "kept", ""): 40, ("synthetic", "kept", ""): 36,
                    ("synthetic", "dropped", "probe"): 4}  # reasons grouped by what precedes ":"
    trail = lookup(dsns, "img010")
    assert [(d.stage, d.decision, d.score) for d in trail] == [("validate", "kept", None), ("synthetic", "dropped", 0.9)]
    assert dropped_items(dsns) == {"img000": "synthetic", "img010": "synthetic", "img020": "synthetic",
                                   "img030": "synthetic"}
    # A later decision on the same (item, stage) replaces the earlier one.
    record(dsns, [Decision("img010", "synthetic", "kept", 0.2, "", 1)])
    assert lookup(dsns, "img010")[-1].decision == "kept" and "img010" not in dropped_items(dsns)

    assert cli.main(["--dsn", dsns[0], "--dsn", dsns[1], "lineage", "img020", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["stage"] for t in out["trail"]] == ["validate", "synthetic"] and out["trail"][1]["decision"] == "dropped"
    assert cli.main(["--dsn", dsns[0], "--dsn", dsns[1], "lineage", "nope"]) == 1  # never seen: says so, exit 1
    assert "no stage recorded a decision" in capsys.readouterr().out
    assert cli.main(["--dsn", dsns[0], "--dsn", dsns[1], "lineage", "--summary"]) == 0
    assert "synthetic    dropped         3  probe" in capsys.readouterr().out  # img010 was re-decided: kept


def test_a_bad_decision_is_refused_before_anything_is_written(make_shards):
    dsns = make_shards(1)
    with pytest.raises(ValueError, match="decision must be one of"):
        record(dsns, [Decision("a", "validate", "kept"), Decision("b", "validate", "maybe")])
    with pytest.raises(ValueError, match="score must be finite"):
        Decision("c", "synthetic", "kept", float("nan"))
    assert summary(dsns) == []
