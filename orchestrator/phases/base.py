"""A phase acts, and knows how to undo what it did; the runner is the only one that walks them."""

from __future__ import annotations

from abc import ABC, abstractmethod

from orchestrator.journal import Stage
from orchestrator.plan import Context


class Phase(ABC):
    name: str
    #: The stage the migration enters when this phase begins (None: it stays where it is).
    stage: Stage | None = None
    #: Only cleans up after a verified move: its failure is noted, never rolled back.
    cleanup: bool = False

    @abstractmethod
    def act(self, ctx: Context) -> None: ...

    def undo(self, ctx: Context) -> None:  # noqa: B027 - most phases change nothing to undo
        """Undo act (also after a partial act); must be safe to call when act did nothing."""
