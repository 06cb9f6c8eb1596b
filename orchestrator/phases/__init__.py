"""The phases of a migration; `build` makes a strategy's list from the strategy table."""

from __future__ import annotations

from orchestrator.phases.base import Phase
from orchestrator.strategies import Strategy


def build(strategy: Strategy) -> list[Phase]:
    """Fresh phase objects for one run of strategy, in its order."""
    from orchestrator.phases import (
        confirm,
        dump,
        imagepipe,
        pageserver,
        postcopy,
        precopy,
        preflight,
        prepare,
        restore,
        transfer,
        verify,
    )  # fmt: skip

    kinds: list[type[Phase]] = [
        preflight.Preflight, prepare.Prepare, precopy.Precopy, precopy.FinalRound,
        pageserver.PageServer, pageserver.PageTunnel, imagepipe.ImagePipe, dump.Dump,
        dump.LazyDump,
        transfer.Transfer, restore.Restore, postcopy.LazyRestore, postcopy.PullPages,
        verify.Verify, confirm.Confirm,
    ]  # fmt: skip
    by_name = {k.name: k for k in kinds}
    return [by_name[name]() for name in strategy.phases]
