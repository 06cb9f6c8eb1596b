"""An append-only, fsync'd record of each migration on the controller (JSON lines), and the
state it adds up to.

Each phase is journaled under its own name with a state (begin, done, failed) and the facts
undo needs; a phase that begins also moves the migration's Stage, which only goes forward
(libvirt's qemuMigrationJobPhase is the model). `recover` reads the State, never events.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError
from orchestrator.errors import JournalError
from orchestrator.procparse import parse_locks

log = logging.getLogger("migrate")


class Stage(IntEnum):
    """How far a migration got on the hosts; what recovery must consider."""

    PLANNED = 0  # pre-flight: nothing changed anywhere (but its probe opens the ssh link)
    PREPARED = 1  # image dirs, the ssh link, page channels, warm copies exist
    PRECOPY = 2  # pre-copy rounds: the workload still runs on the source
    FROZEN = 3  # a dump began: the source may be stopped
    RESTORING = 4  # a restore began: a destination copy may exist
    RESUMED = 5  # post-copy: the destination resumed, no rollback from here on
    CONFIRMING = 6  # confirm began: the source copy may be gone


class PhaseState:
    BEGIN = "begin"
    DONE = "done"
    FAILED = "failed"


class Journal:
    """Every phase transition is written and fsync'd before the phase acts."""

    def __init__(self, state_dir: Path, migration_id: str) -> None:
        self.dir = state_dir / "journal"
        self.path = self.dir / f"{migration_id}.jsonl"
        self.stage = Stage.PLANNED
        self._held: int | None = None  # the fd whose flock says a live process owns it

    def write(self, event: str, **fields: Any) -> None:
        """Append one record, whole and on disk, or raise JournalError."""
        line = json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=str)
        data = (line + "\n").encode()
        try:
            created = not self.path.exists()
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                while data:  # a short write is carried on, never left torn
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.dir)
        except OSError as e:
            raise JournalError(f"cannot write the journal {self.path}: {e.strerror or e}") from None

    def hold(self) -> None:
        """Hold this migration's journal for as long as this process lives (an flock the
        kernel drops when it dies): a live controller is told apart from a dead one, and two
        recovers of one migration cannot run at once. JournalError if someone holds it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for d in (self.dir.parent, self.dir):
                _check_private(d)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise JournalError(f"cannot open the journal {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(
                f"migration {self.path.stem} is live: another process holds {self.path}"
            ) from None
        self._held = fd

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def advance(self, stage: Stage | None) -> None:
        """Move to stage (None: stay); going backwards is refused (a bug, or a second writer)."""
        if stage is None:
            return
        if stage < self.stage:
            raise JournalError(
                f"journal {self.path}: {stage.name} would go back from {self.stage.name}"
            )
        self.stage = stage


def _check_private(path: Path) -> None:
    """A state dir another user could write to (or that someone else owns) could be fed a
    journal that `recover` acts on: refused."""
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise JournalError(
            f"the state dir {path} is owned by uid {st.st_uid} with mode "
            f"{st.st_mode & 0o777:o}: it must be yours and not group/world-writable "
            f"(chmod go-w {path})"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NullJournal(Journal):
    """For dry runs: records nothing."""

    def __init__(self) -> None:
        self.stage = Stage.PLANNED
        self.path = Path("-")
        self._held = None

    def write(self, event: str, **fields: Any) -> None:
        return None

    def hold(self) -> None:
        return None


@dataclass
class Summary:
    """One migration as its journal tells it: who, where, how far, and what undo needs."""

    id: str
    path: Path
    started: float
    workload: str
    source: str
    destination: str
    strategy: str
    status: str | None  # None: unfinished (the controller died, or it still runs)
    last_phase: str | None
    running: bool = False  # unfinished, and a live process holds its journal (its controller)
    stage: Stage = Stage.PLANNED
    keep_images: bool = False
    workload_config: dict[str, Any] = field(default_factory=dict)
    # The latest facts phases recorded (runner._facts): root_pid, command, net, ...
    facts: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> dict[str, Any]:
        return self.events[0]

    @property
    def root_pid(self) -> int | None:
        return _int(self.facts.get("root_pid"))

    @property
    def start_time(self) -> int | None:
        return _int(self.facts.get("start_time"))

    def holds(self, source: str, root_pid: int, start_time: int | None) -> bool:
        """Whether this migration is about that process (a pid and its start time, on source),
        whatever name it was given (`c1`, `pid:N`, `pidfile:P` can all be one process)."""
        same_start = None in (start_time, self.start_time) or start_time == self.start_time
        return self.source == source and self.root_pid == root_pid and same_start

    @property
    def restored_pid(self) -> int | None:
        return _int(self.facts.get("restored_pid"))

    @property
    def committed(self) -> bool:
        return bool(self.facts.get("committed")) or self.stage >= Stage.RESUMED


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def read_events(path: Path) -> list[dict[str, Any]]:
    """The records of one journal file; a torn or garbage line is skipped with a warning."""
    events = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            log.warning("%s line %d: not a journal record; skipped", path, n)
            continue
        events.append(event)
    return events


FACT_KEYS = (
    "root_pid", "start_time", "command", "namespaces", "restored_pid", "restored_start", "net",
    "network_lock", "new_paths", "self_stopped", "committed", "page_port", "rounds",
)  # fmt: skip
# Journals written before stages were recorded: the stage each phase's begin meant.
_STAGE_OF = {"preflight": Stage.PLANNED, "prepare": Stage.PREPARED, "rounds": Stage.PRECOPY,
             "precopy": Stage.PRECOPY,
             "page-server": Stage.PREPARED, "page-tunnel": Stage.PREPARED, "dump": Stage.FROZEN,
             "lazy-dump": Stage.FROZEN, "restore": Stage.RESTORING,
             "lazy-restore": Stage.RESTORING, "pull-pages": Stage.RESUMED,
             "confirm": Stage.CONFIRMING}  # fmt: skip


def _stage(e: dict[str, Any]) -> Stage:
    value = e.get("stage")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= max(Stage):
        return Stage(value)
    return _STAGE_OF.get(str(e.get("name")), Stage.PLANNED)


_START_KEYS = ("id", "workload", "source", "destination", "strategy")


def summarize(path: Path) -> Summary | None:
    """Fold one journal into its Summary; None if it has no usable start record."""
    try:
        events = read_events(path)
    except OSError as err:
        log.warning("%s: cannot read: %s", path, err)
        return None
    if not events or events[0]["event"] != "start":
        return None
    start = events[0]
    if not all(isinstance(start.get(k), str) for k in _START_KEYS) or start["id"] != path.stem:
        log.warning("%s: its start record does not name this migration; skipped", path)
        return None
    s = Summary(
        id=start["id"], path=path, started=float(start.get("t") or 0), workload=start["workload"],
        source=start["source"], destination=start["destination"], strategy=start["strategy"],
        status=None, last_phase=None, keep_images=bool(start.get("keep_images")),
        workload_config=dict(start.get("workload_config") or {}), events=events,
    )  # fmt: skip
    for e in events[1:]:
        if e["event"] == "phase":
            s.last_phase = str(e.get("name"))
            if e.get("state") == PhaseState.BEGIN:
                s.stage = max(s.stage, _stage(e))
            nested = e.get("facts")
            facts: dict[str, Any] = nested if isinstance(nested, dict) else e  # (older: flat)
            s.facts.update({k: facts[k] for k in FACT_KEYS if facts.get(k) is not None})
        elif e["event"] == "end":
            s.status = str(e.get("status"))
    if s.status is None:
        s.running = _held(path)
    return s


def _held(path: Path) -> bool:
    """Whether a live process holds path's flock (Journal.hold), read from /proc/locks: taking
    the lock to find out would make a recover starting at that instant see it live."""
    try:
        st = path.stat()
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            locks = parse_locks(f.read())
    except OSError:
        return False
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    return any(
        lk.kind == "FLOCK" and lk.inode == st.st_ino and _dev(lk.device) == dev for lk in locks
    )


def _dev(text: str) -> tuple[int, int] | None:
    """/proc/locks' MAJ:MIN (hex) as numbers."""
    major, _, minor = text.partition(":")
    try:
        return int(major, 16), int(minor, 16)
    except ValueError:
        return None


def summaries(state_dir: Path) -> list[Summary]:
    """Every journaled migration, oldest first."""
    found = (summarize(p) for p in sorted((state_dir / "journal").glob("*.jsonl")))
    return sorted((s for s in found if s is not None), key=lambda s: s.started)


def find(state_dir: Path, migration_id: str) -> Summary:
    path = state_dir / "journal" / f"{migration_id}.jsonl"
    ok = "/" not in migration_id and migration_id not in (".", "..") and path.is_file()
    summary = summarize(path) if ok else None
    if summary is None:
        raise ConfigError(f"no migration {migration_id!r} in {state_dir / 'journal'}")
    return summary
