"""Progress of running migrations: one Event per phase change, and a live view of them.

The runner calls its listener with (phase name, result or None when the phase begins);
`listener` turns that into an Event carrying what the context knows at that moment: bytes
moved so far and, for strategies that copy in rounds, the round number: `ctx.round` if a
strategy sets it, else the number of rounds in `ctx.rounds` (pre-copy appends one per round),
else "round N" in the phase's name. A sink with a `watch(ctx)` method (the live view) is also
handed the context, and reads bytes and rounds from it on every redraw, so a phase that runs
many rounds shows them as they happen.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from orchestrator.plan import Context
from orchestrator.report import PhaseResult

_ROUND = re.compile(r"\bround[ #-]*(\d+)\b")


@dataclass(frozen=True)
class Event:
    workload: str
    destination: str
    phase: str
    status: str | None  # None: the phase began; else the PhaseResult's status
    bytes: int  # moved so far by this migration
    round: int | None = None  # precopy round, when the strategy has rounds
    error: str | None = None
    t: float = field(default_factory=time.monotonic)


Sink = Callable[[Event], None]


def round_of(name: str, ctx: Context) -> int | None:
    """The round a phase belongs to: ctx.round if the strategy sets it, else from its name."""
    value = getattr(ctx, "round", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    rounds = getattr(ctx, "rounds", None)
    if isinstance(rounds, list) and rounds:
        return len(rounds)
    m = _ROUND.search(name)
    return int(m.group(1)) if m else None


def listener(ctx: Context, sink: Sink) -> Callable[[str, PhaseResult | None], None]:
    """A runner listener that sends one Event per phase change to sink."""
    watch = getattr(sink, "watch", None)
    if watch is not None:
        watch(ctx)

    def listen(name: str, result: PhaseResult | None) -> None:
        sink(
            Event(
                workload=ctx.plan.workload.name,
                destination=ctx.plan.destination.name,
                phase=name,
                status=result.status if result else None,
                bytes=ctx.bytes_transferred,
                round=round_of(name, ctx),
                error=result.error if result else None,
            )
        )

    return listen


def interactive() -> bool:
    """A live view only for a person at a terminal; logs and pipes stay quiet."""
    return sys.stdout.isatty()


@dataclass
class _Row:
    workload: str
    destination: str = "-"
    phase: str = "waiting"
    state: str = "waiting"
    started: float | None = None
    bytes: int = 0
    round: int | None = None
    ended: float | None = None
    ctx: Context | None = None  # read on every redraw while the migration runs


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class LiveView:
    """A table of migrations redrawn a few times a second (rich); safe to feed from threads."""

    def __init__(self, workloads: list[str] | None = None) -> None:
        self._rows = {w: _Row(w) for w in workloads or []}
        self._lock = threading.Lock()
        self._live: Any = None

    def watch(self, ctx: Context) -> None:
        """Follow this migration's bytes and rounds between its phase changes."""
        with self._lock:
            name = ctx.plan.workload.name
            self._rows.setdefault(name, _Row(name)).ctx = ctx

    def __call__(self, ev: Event) -> None:
        with self._lock:
            row = self._rows.setdefault(ev.workload, _Row(ev.workload))
            row.destination = ev.destination
            row.started = row.started or ev.t
            row.phase, row.bytes = ev.phase, ev.bytes
            row.round = ev.round if ev.round is not None else row.round
            row.state = "running" if ev.status is None else ev.status
            if ev.phase == "end":
                row.phase, row.ended, row.ctx = "-", ev.t, None

    def render(self) -> Any:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col in ("workload", "to", "phase", "round", "elapsed", "moved", "rate", "state"):
            table.add_column(
                col, justify="right" if col in ("elapsed", "moved", "rate") else "left"
            )
        now = time.monotonic()
        with self._lock:
            rows = list(self._rows.values())
        for r in rows:
            if r.ctx is not None:  # a running migration: its live numbers
                r.bytes = max(r.bytes, r.ctx.bytes_transferred)
                r.round = round_of(r.phase, r.ctx) or r.round
            secs = (r.ended or now) - r.started if r.started else 0.0
            rate = human_bytes(r.bytes / secs) + "/s" if secs > 0 and r.bytes else "-"
            table.add_row(
                r.workload, r.destination, r.phase, str(r.round) if r.round else "-",
                f"{secs:.1f}s", human_bytes(r.bytes) if r.bytes else "-", rate, r.state,
            )  # fmt: skip
        return table

    def __enter__(self) -> LiveView:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(
            get_renderable=self.render,
            console=Console(),
            refresh_per_second=4,
            transient=False,
        )
        self._live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()
