"""Fault: the link between source and destination is cut while the images are on their way.

The cut is an nftables rule in the source's netns (labmod.cut_link): the controller still
reaches both hosts, only host-to-host traffic (the rsync push and its ssh master) is lost. It is
made when the journal shows `dump` begin, so the transfer starts into a cut link."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import (
    POLICY,
    Background,
    FaultCase,
    assert_one_copy,
    leftovers,
    phases,
)

pytestmark = pytest.mark.lab


def _mend_after(lab: labmod.Lab, run: Background, seconds: float) -> float:
    """Mend host-a <-> host-b `seconds` after the transfer began; how long the link was cut."""
    cut_at = time.monotonic()
    run.wait("transfer", "begin")
    time.sleep(max(0.0, seconds - (time.monotonic() - cut_at)))
    labmod.mend_link(lab, "host-a", "host-b")
    return time.monotonic() - cut_at


def test_short_cut_heals(
    lab: labmod.Lab,
    fault_case: Callable[..., FaultCase],
    links: Callable[..., None],
) -> None:
    """Packets dropped for ~3 s, then the link is back: the transfer goes on (TCP retransmits,
    or rsync is retried) well within the retry deadline, and the migration succeeds."""
    fc = fault_case("link a-b dropped 3 s during transfer", "fault-net-short", strategy="stopcopy")
    wl, before = fc.wl, fc.before

    run = fc.background("host-b")
    run.wait("dump", "begin")
    links("host-a", "host-b", "drop")
    cut_for = _mend_after(lab, run, 3.0)
    out = run.finish()
    fc.ended(out)

    assert cut_for < POLICY["retry_deadline"]
    assert out.rc == 0, out
    assert out.status == "succeeded"
    assert out.report and out.report["restored_pid"]
    c = assert_one_copy(lab, wl, "host-b", before)
    assert c.where() == {"host-b": [out.report["restored_pid"]]}
    assert leftovers(lab, out.id) == []


def test_refused_link_is_retried(
    lab: labmod.Lab,
    fault_case: Callable[..., FaultCase],
    links: Callable[..., None],
) -> None:
    """Connections refused (TCP reset) for ~3 s: the first rsync fails at once, a retry after
    the link is back succeeds within the deadline; the report says the transfer was retried."""
    fc = fault_case("link a-b refused 3 s during transfer", "fault-net-refused",
                    strategy="stopcopy")  # fmt: skip
    wl, before = fc.wl, fc.before

    run = fc.background("host-b")
    run.wait("dump", "begin")
    links("host-a", "host-b", "reject")
    _mend_after(lab, run, 3.0)
    out = run.finish()
    fc.ended(out)

    assert out.rc == 0, out
    assert out.status == "succeeded"
    assert "retrying" in out.stderr, "the first rsync attempt should have failed and been retried"
    c = assert_one_copy(lab, wl, "host-b", before)
    assert c.where() == {"host-b": [out.report["restored_pid"]]}  # type: ignore[index]
    assert leftovers(lab, out.id) == []
    # The operator learns from the report, not only from stderr, that the transfer was retried.
    assert any("rsync" in n and "retr" in n for n in out.notes), (
        f"no note in the report says the transfer was retried: notes {out.notes}"
    )


def test_long_cut_rolls_back(
    lab: labmod.Lab,
    fault_case: Callable[..., FaultCase],
    links: Callable[..., None],
) -> None:
    """Cut for good (longer than the retry deadline): the transfer gives up, everything is undone
    and the source runs on, as before."""
    fc = fault_case("link a-b dropped for good (> deadline)", "fault-net-long",
                    strategy="stopcopy")  # fmt: skip
    wl, before = fc.wl, fc.before

    run = fc.background("host-b")
    run.wait("dump", "begin")
    links("host-a", "host-b", "drop")
    out = run.finish(timeout=90)
    fc.ended(out)
    labmod.mend_link(lab, "host-a", "host-b")

    assert out.rc == 3, out
    assert out.status == "rolled_back"
    assert ("transfer", "failed") in phases(out), phases(out)
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}
    # Nothing of it is left, even now the link is back (no rsync going on, or finishing late).
    time.sleep(1)
    assert leftovers(lab, out.id) == []
    # The error names the fault: the transfer to host-b (not a timeout "on host-a").
    assert "host-b" in out.error and ("rsync" in out.error or "transfer" in out.error), (
        f"the error does not name the transfer to host-b: {out.error}"
    )


def test_cut_before_the_run_fails_in_preflight(
    lab: labmod.Lab,
    fault_case: Callable[..., FaultCase],
    links: Callable[..., None],
) -> None:
    """The link is down before the run: pre-flight's probe (the opening of the ssh master the
    migration would use) fails, one line names host-b's ssh link, nothing was frozen, and no
    master, log or image dir is left on either host."""
    fc = fault_case("link a-b dropped before the run", "fault-net-before")
    wl, before = fc.wl, fc.before
    links("host-a", "host-b", "drop")
    out = fc.migrate()
    fc.ended(out)

    assert out.rc == 1, out
    assert out.status == "failed"
    assert phases(out) == [("preflight", "failed")], phases(out)
    assert out.error.startswith("host-a cannot open its ssh link to host-b:"), out.error
    assert "\n" not in out.error
    c = assert_one_copy(lab, wl, "host-a", before)
    assert c.where() == {"host-a": [wl.root_pid]}
    assert leftovers(lab, out.id) == []
