"""Confirm: only now is the stopped source killed and the images wiped on both hosts."""

from __future__ import annotations

from orchestrator import actions
from orchestrator.journal import Stage
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Confirm(Phase):
    name = "confirm"
    stage = Stage.CONFIRMING
    #: The workload runs on the destination, verified: a failure here is noted, not undone.
    cleanup = True

    def act(self, ctx: Context) -> None:
        assert ctx.target is not None
        actions.remove_source(ctx)
        actions.wipe_images(ctx)
