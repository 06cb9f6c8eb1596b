"""An append-only, fsync'd record of each migration on the controller (JSON lines)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


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
