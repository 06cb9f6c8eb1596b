"""An append-only, fsync'd record of each migration on the controller (JSON lines)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError


class Journal:
    """Every phase transition is written and fsync'd before the phase acts."""

    def __init__(self, state_dir: Path, migration_id: str) -> None:
        self.dir = state_dir / "journal"
        self.path = self.dir / f"{migration_id}.jsonl"

    def write(self, event: str, **fields: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=str)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


class NullJournal(Journal):
    """For dry runs: records nothing."""

    def __init__(self) -> None:
        pass

    def write(self, event: str, **fields: Any) -> None:
        return None


@dataclass
class Summary:
    """One migration as its journal tells it."""

    id: str
    path: Path
    started: float
    workload: str
    source: str
    destination: str
    strategy: str
    status: str | None  # None: unfinished (the controller died, or it still runs)
    last_phase: str | None
    root_pid: int | None
    restored_pid: int | None
    events: list[dict[str, Any]]

    @property
    def start(self) -> dict[str, Any]:
        return self.events[0]


def summarize(path: Path) -> Summary | None:
    """Read one journal; None if it has no start record. A torn last line is skipped."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not events or events[0].get("event") != "start":
        return None
    start, status, last, root, restored = events[0], None, None, None, None
    for e in events:
        if e["event"] == "phase":
            last = e["name"]
        if e.get("root_pid"):
            root = e["root_pid"]
        if "restored_pid" in e:
            restored = e["restored_pid"] or restored
        if e["event"] == "end":
            status = e["status"]
    return Summary(
        id=start["id"],
        path=path,
        started=start["t"],
        workload=start["workload"],
        source=start["source"],
        destination=start["destination"],
        strategy=start["strategy"],
        status=status,
        last_phase=last,
        root_pid=root,
        restored_pid=restored,
        events=events,
    )


def summaries(state_dir: Path) -> list[Summary]:
    """Every journaled migration, oldest first."""
    found = (summarize(p) for p in sorted((state_dir / "journal").glob("*.jsonl")))
    return sorted((s for s in found if s is not None), key=lambda s: s.started)


def find(state_dir: Path, migration_id: str) -> Summary:
    path = state_dir / "journal" / f"{migration_id}.jsonl"
    summary = summarize(path) if path.is_file() and "/" not in migration_id else None
    if summary is None:
        raise ConfigError(f"no migration {migration_id!r} in {state_dir / 'journal'}")
    return summary
