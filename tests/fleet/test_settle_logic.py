"""What a retried attempt settles from (pure: no engine, no lab): the earlier attempts'
journals merged from the last heartbeat and the anchors, and how they are written locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator import journal
from orchestrator.fleet.activities import _busy, _candidates, _materialize
from orchestrator.fleet.types import BUSY


def events(mid: str, t: float, phases: list[str], end: str | None = None) -> list[dict[str, Any]]:
    start = {"t": t, "event": "start", "id": mid, "workload": "w", "source": "a",
             "destination": "b", "strategy": "stopcopy"}  # fmt: skip
    out: list[dict[str, Any]] = [start]
    for i, name in enumerate(phases):
        out.append({"t": t + i + 1, "event": "phase", "name": name, "state": "begin",
                    "root_pid": 7 if i else None})  # fmt: skip
    if end:
        out.append({"t": t + 99, "event": "end", "status": end})
    return out


def test_candidates_take_the_longest_journal_per_id_oldest_first() -> None:
    anchored_x = events("x", 10, ["preflight", "prepare"])
    beat_x = events("x", 10, ["preflight", "prepare", "dump", "transfer"])
    anchored_y = events("y", 50, ["preflight", "prepare"])
    # The heartbeat may lag (shorter than the anchor) or lead; either way the longest wins.
    assert _candidates({"id": "x", "journal": beat_x}, [anchored_x]) == [beat_x]
    short = events("x", 10, ["preflight"])
    assert _candidates({"id": "x", "journal": short}, [anchored_x]) == [anchored_x]
    # Heartbeats without the journal (lost): the anchors alone, every id, oldest first.
    assert _candidates({"id": "y", "journal": []}, [anchored_y, anchored_x]) == [
        anchored_x,
        anchored_y,
    ]
    assert _candidates(None, []) == []
    assert _candidates({"phase": "start"}, [[{"event": "phase"}]]) == []


def test_materialize_never_shortens_or_reopens_a_local_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal" / "x.jsonl"
    _materialize(tmp_path, events("x", 10, ["preflight", "prepare"]))
    assert len(journal.find(tmp_path, "x").events) == 3
    _materialize(tmp_path, events("x", 10, ["preflight"]))  # shorter: kept as it was
    assert len(journal.find(tmp_path, "x").events) == 3
    longer = events("x", 10, ["preflight", "prepare", "dump"])
    _materialize(tmp_path, longer)  # longer and unfinished here: replaced
    assert journal.find(tmp_path, "x").last_phase == "dump"
    done = events("x", 10, ["preflight"], end="rolled_back")
    path.write_text("".join(json.dumps(e) + "\n" for e in done))
    _materialize(tmp_path, events("x", 10, ["preflight", "prepare", "dump", "transfer"]))
    assert journal.find(tmp_path, "x").status == "rolled_back"  # ended here: never reopened
    _materialize(tmp_path, events("../y", 10, ["preflight"]))  # not a plain id: ignored
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == ["x.jsonl"]


def test_a_held_evacuation_lock_is_busy_unless_its_holder_is_this_workflows_dead_hold() -> None:
    """A retried hold finds the lock still held by its own earlier attempt (its worker died,
    its agent not yet gone): retry, that frees; held by anyone else: BUSY, no retry."""
    own = _busy("host-a", "fleet evacuation evacuate/host-a by worker vm:12 since T", "held")
    assert own.type is None and not own.non_retryable
    for other in ("evacuation by vm pid 7 since T",
                  "fleet evacuation evacuate/host-ab by worker vm:12 since T"):  # fmt: skip
        busy = _busy("host-a", other, "held")
        assert busy.type == BUSY and busy.non_retryable, other
