"""Post-copy's pure pieces: strategy choice, pre-flight needs, CRIU's readiness and logs."""

from __future__ import annotations

import pytest

from orchestrator import strategies
from orchestrator.checkpoint import Capability
from orchestrator.config import Policy
from orchestrator.criu import background
from orchestrator.criu import commands as criu
from orchestrator.criu.logs import pages_pulled
from orchestrator.criu.pagechannel import PageChannel, dump_flags, lazy_pages
from orchestrator.errors import MigrationError
from orchestrator.facts import HostFacts
from orchestrator.hostcheck import unmet

ALL = frozenset(Capability)


SOFT_DIRTY = ["mem_dirty_track"]


@pytest.mark.parametrize(
    ("allow", "src", "dst", "can", "expected"),
    [
        (False, [], ["uffd-noncoop"], ALL, "stream"),  # never without the policy's consent
        (False, SOFT_DIRTY, ["uffd-noncoop"], ALL, "precopy"),
        (True, [], ["uffd-noncoop"], ALL, "postcopy"),
        (True, SOFT_DIRTY, ["uffd-noncoop"], ALL, "hybrid"),  # rounds, then post-copy
        (True, [], [], ALL, "stream"),  # no userfaultfd on the destination
        (True, SOFT_DIRTY, [], ALL, "precopy"),
        (True, [], ["uffd-noncoop"], frozenset(), "stopcopy"),  # runtime cannot
    ],
)
def test_auto_picks_postcopy_only_when_allowed_and_possible(
    allow: bool, src: list[str], dst: list[str], can: frozenset[Capability], expected: str
) -> None:
    name, why = strategies.choose(Policy(allow_postcopy=allow), src, dst, can, ["python3"])
    assert name == expected and why.startswith("auto: ")


def test_auto_without_python3_on_both_hosts_falls_back_to_stop_copy() -> None:
    name, why = strategies.choose(Policy(allow_postcopy=True), [], ["uffd-noncoop"], ALL)
    assert name == "stopcopy"
    assert "not stream: it needs python3 on both hosts" in why


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(Exception, match="unknown strategy 'fast'"):
        strategies.resolve("fast")


def test_postcopy_needs_name_what_is_missing() -> None:
    needs = strategies.TABLE["postcopy"].needs
    src = HostFacts("a", features=("uffd-noncoop",), pipe_max=1 << 20, commands=())
    dst = HostFacts("b", features=(), pipe_max=4 << 20)
    problems = unmet(needs, "post-copy", src, dst)
    assert any("uffd-noncoop on b" in p for p in problems)
    assert any("fs.pipe-max-size >= 4194304 on a (it is 1048576)" in p for p in problems)
    assert any("python3 on a" in p for p in problems)
    ok_src = HostFacts("a", features=(), pipe_max=4 << 20, commands=("python3",))
    assert (
        unmet(
            needs,
            "post-copy",
            ok_src,
            HostFacts("b", features=("uffd-noncoop",), pipe_max=8 << 20, commands=("python3",)),
        )
        == []
    )


def test_lazy_command_lines() -> None:
    channel = PageChannel.for_dirs("/a", "/b", lazy=True)
    opts = criu.DumpOptions(pid=7, images_dir="/i", channel_flags=dump_flags(channel))
    dump = criu.dump("criu", opts)
    assert dump[-3:] == ["--lazy-pages", "--ps-socket", "5"] and "--port" not in dump
    rest = criu.restore(
        "criu", criu.RestoreOptions(images_dir="/i", pidfile="/i/p", lazy_pages=True)
    )
    assert "--lazy-pages" in rest
    daemon = lazy_pages("criu", "/i")
    assert daemon[:3] == ["criu", "lazy-pages", "--page-server"] and "--ps-socket" in daemon


def test_background_readiness_and_exit_codes() -> None:
    assert background.parse_start("ready\n") == background.Started(True)
    assert background.parse_start("exited 1\n") == background.Started(False, "1")
    with pytest.raises(MigrationError):
        background.parse_start("")
    assert background.parse_wait("0\n") == 0 and background.parse_wait("running\n") is None
    argv = background.start_argv("/i", "dump", 30, ["criu", "dump"])
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["sh", "/i", "dump", "30", "criu", "dump"]


def test_pages_pulled_sums_every_task() -> None:
    log = (
        "(03.1) uffd: 7-11: UFFD transferred pages: (100/100)\n"
        "(03.2) uffd: 8-12: UFFD transferred pages: (20/25)\n"
    )
    assert pages_pulled(log) == (120, 125)


@pytest.mark.parametrize(
    ("holds", "expected", "said"),
    [
        ((strategies.FILE_LOCKS,), "stopcopy", "not stream: the workload holds file locks"),
        ((strategies.HOST_TCP,), "stream", "not post-copy: the workload holds TCP connections"),
        ((), "postcopy", ""),
    ],
)
def test_auto_picks_what_can_carry_what_the_workload_holds(
    holds: tuple[str, ...], expected: str, said: str
) -> None:
    name, why = strategies.choose(Policy(allow_postcopy=True), [], ["uffd-noncoop"], ALL,
                                  ["python3"], holds)  # fmt: skip
    assert name == expected and said in why
