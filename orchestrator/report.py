"""The report of one migration, as the runner fills it; rendered by the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PhaseResult:
    name: str
    status: str  # ok | failed | undone | undo_failed | skipped
    seconds: float
    error: str | None = None


@dataclass
class Round:
    """One pre-copy round (kind pre-dump), or the final dump under the freeze (kind dump)."""

    number: int
    kind: str  # pre-dump | dump | lazy-dump (hybrid: pages_written = pages pulled after)
    pages_written: int
    pages_skipped_parent: int
    bytes_sent: int  # by rsync for this round (the final dump's bytes: its transfer phase)
    seconds: float  # dump + transfer
    dump_seconds: float
    transfer_seconds: float
    dirty_rate: float | None  # pages/s dirtied since the previous round (None for the first)
    frozen_ms: float  # CRIU's own frozen time in this dump


@dataclass
class Report:
    id: str
    workload: str
    source: str
    destination: str
    strategy: str
    status: str = "failed"  # succeeded | rolled_back | failed | stranded
    phases: list[PhaseResult] = field(default_factory=list)
    downtime_ms: int | None = None
    # The freeze taken apart (orchestrator/freeze.py): CRIU's dump, the transfer inside the
    # freeze, CRIU's restore, CRIU's own figures, and the orchestration's overhead.
    freeze: dict[str, Any] | None = None
    postcopy_tail_ms: int | None = None  # post-copy: running on destination -> all pages there
    total_ms: int = 0
    bytes_transferred: int = 0
    restored_pid: int | None = None
    network: dict[str, Any] | None = None  # address, bridge, connections kept, freeze
    transfer: dict[str, Any] = field(default_factory=dict)  # bwlimit, compress
    rounds: list[Round] = field(default_factory=list)  # pre-copy rounds, then the final dump
    stopped_by: str | None = None  # which stop rule ended pre-copy
    error: str | None = None
    criu_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    planned_commands: list[str] = field(default_factory=list)
    bad_input: bool = False  # refused in pre-flight for what was asked (exit 2), not a fault

    # stranded: failed past the point of no return (post-copy), nothing undone: see the notes.
    EXIT_CODES = {"succeeded": 0, "rolled_back": 3, "failed": 1, "stranded": 4}

    @property
    def exit_code(self) -> int:
        if self.bad_input and self.status == "failed":
            return 2
        return self.EXIT_CODES.get(self.status, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.planned_commands:
            d.pop("planned_commands")
        d.pop("bad_input")
        return d
