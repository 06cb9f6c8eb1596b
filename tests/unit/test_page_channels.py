"""Stream and post-copy with fake hosts: the page channel's commands (Unix sockets in the image
dirs, no TCP port), the lazy dump's abort through it, and each way pulling pages can fail after
the point of no return."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator import phases, runner
from orchestrator.config import HostConfig, Policy
from orchestrator.criu import background, pagechannel
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import ID, Pair, criu, fail, inner, pair, script, verbs, words


def run(p: Pair):  # type: ignore[no-untyped-def]
    return runner.run(p.ctx, phases.build(p.ctx.strategy), p.journal)


def forwards(p: Pair) -> list[list[str]]:
    return [argv[-4:] for _, argv in p.log if argv[:1] == ["ssh"] and "-O" in argv
            and argv[argv.index("-O") + 1] in ("forward", "cancel")]  # fmt: skip


def helper(p: Pair, host: str, mode: str) -> list[list[str]]:
    """The page channel helper's runs in this mode on host."""
    return [a for h, a in p.log if h == host and "python3" in a and mode in a[a.index("-c") + 2 :]]


def test_stream_pages_go_over_the_page_channel(tmp_path: Path) -> None:
    p = pair(tmp_path, "stream")
    report = run(p)
    assert report.status == "succeeded", report.error
    [serve] = helper(p, "b", "serve")
    server = inner(serve)
    assert server[:2] == ["criu", "page-server"] and server[server.index("--ps-socket") + 1] == "5"
    assert f"/wb/images/{ID}/pages.sock" in serve
    dump = next(a for h, a in p.log if h == "a" and criu("dump")(a))
    assert "connect" in dump and f"/wa/images/{ID}/pages.sock" in dump  # helper connects...
    assert inner(dump)[inner(dump).index("--page-server") + 1] == "--ps-socket"  # ...then CRIU
    assert not any("--port" in a or "--address" in a for _, a in p.log if criu("dump")(a))
    spec = f"/wa/images/{ID}/pages.sock:/wb/images/{ID}/pages.sock"
    assert forwards(p)[0] == ["forward", "-L", spec, "198.18.0.2"]


def test_a_page_server_that_cannot_start_is_refused_before_the_freeze(tmp_path: Path) -> None:
    p = pair(tmp_path, "stream")
    p.dst.on(lambda a: "python3" in a and "serve" in a, err="pages.sock exists", code=1)
    report = run(p)
    assert report.status == "rolled_back" and "cannot open the page channel" in (report.error or "")
    assert "a: criu dump" not in verbs(p.log)


def test_a_socket_path_too_long_is_one_line(tmp_path: Path) -> None:
    p = pair(tmp_path, "stream")
    long = HostConfig("b", "198.18.0.2", "/k", "/kh", workdir="/" + "w" * 90)
    p.ctx.plan = dataclasses.replace(p.ctx.plan, destination=long)
    p.ctx.dst_images = p.ctx.plan.dst_layout
    report = run(p)
    assert report.status == "rolled_back" and "too long for a Unix socket" in (report.error or "")


def test_post_copy_commits_at_its_lazy_restore(tmp_path: Path) -> None:
    p = pair(tmp_path, "postcopy")
    report = run(p)
    assert report.status == "succeeded", report.error
    assert any("no rollback is possible" in n for n in report.notes)
    assert helper(p, "b", "hold") and helper(p, "a", "connect")
    take = helper(p, "b", "take")[0]
    assert inner(take)[:3] == ["criu", "lazy-pages", "--page-server"]
    dump = inner(next(a for h, a in p.log if h == "a" and criu("dump")(a)))
    assert dump[dump.index("--lazy-pages") + 1 :][:2] == ["--ps-socket", "5"]
    assert "--lazy-pages" in next(inner(a) for h, a in p.log if h == "b" and criu("restore")(a))


@pytest.mark.parametrize(
    ("dst_wait", "src_wait", "why"),
    [
        ("running\n", "0\n", "not every page arrived"),
        ("1\n", "0\n", "the lazy-pages daemon on b failed (exit 1)"),
        ("0\n", "2\n", "the lazy dump on a failed (exit 2)"),
    ],
)
def test_pages_that_do_not_all_arrive_strand_it(
    tmp_path: Path, dst_wait: str, src_wait: str, why: str
) -> None:
    p = pair(tmp_path, "postcopy")
    policy = dataclasses.replace(p.ctx.plan.policy, postcopy_deadline=1.0)
    p.ctx.plan = dataclasses.replace(p.ctx.plan, policy=policy)
    p.dst.on(script(background._WAIT), dst_wait)
    p.src.on(script(background._WAIT), src_wait)
    report = run(p)
    assert report.status == "stranded" and why in (report.error or "")
    assert "a: kill -KILL 100 101" not in verbs(p.log)  # the source keeps its pages
    assert not any(v.startswith("a: kill -CONT") for v in verbs(p.log))


def test_a_failed_lazy_restore_aborts_the_lazy_dump(tmp_path: Path) -> None:
    """Before the destination resumed: the lazy dump is made to fail (a truncated request on
    the page channel the destination holds), which lets the source run on; nothing is
    restored from images."""
    p = pair(tmp_path, "postcopy")
    fail(p.dst, criu("restore"))
    aborted: list[bool] = []
    p.dst.watchers.append(lambda a: aborted.append(True) if "abort" in a and "python3" in a
                          else None)  # fmt: skip
    p.src.answer(lambda a: Result("a", a, 0, f"100 1 Ss 2048 criu dump -D /wa/images/{ID}\n")
                 if words("ps", "-ww", "-e")(a) and not aborted else None)  # fmt: skip
    report = run(p)
    assert report.status in ("rolled_back", "failed"), report.error
    assert aborted, "the lazy dump was aborted through the page channel"
    assert [x.name for x in report.phases if x.name.startswith("undo")][:2] == [
        "undo lazy-restore", "undo lazy-dump",
    ]  # fmt: skip
    assert "a: criu restore" not in verbs(p.log)


def prefaults(p: Pair) -> list[list[str]]:
    return [a for h, a in p.log if h == "b" and pagechannel.PREFAULT in a]


def prefaulting(tmp_path: Path, strategy: str = "stream", prefault: bool = True) -> Pair:
    return pair(tmp_path, strategy, policy=Policy(retries=2, retry_deadline=5, prefault=prefault))


def test_stream_prefaults_the_destination_before_its_page_server(tmp_path: Path) -> None:
    p = prefaulting(tmp_path)
    report = run(p)
    assert report.status == "succeeded", report.error
    [argv] = prefaults(p)
    rss_kb = p.ctx.target.rss_kb if p.ctx.target else 0
    assert rss_kb > 0 and argv[-1] == str(pagechannel.prefault_mib(rss_kb))
    order = [a for h, a in p.log if h == "b" and "python3" in a]
    assert order.index(argv) < order.index(helper(p, "b", "serve")[0])  # before the freeze


def test_a_failed_prefault_is_a_note_and_the_migration_goes_on(tmp_path: Path) -> None:
    p = prefaulting(tmp_path)
    p.dst.on(lambda a: pagechannel.PREFAULT in a, err="MemoryError", code=1)
    report = run(p)
    assert report.status == "succeeded", report.error
    assert any("prefault on b failed: MemoryError" in n for n in report.notes), report.notes


@pytest.mark.parametrize(("strategy", "prefault"), [("stream", False), ("stopcopy", True)])
def test_no_prefault_when_off_or_not_stream(tmp_path: Path, strategy: str, prefault: bool) -> None:
    p = prefaulting(tmp_path, strategy, prefault)
    assert run(p).status == "succeeded"
    assert prefaults(p) == []


def test_prefault_is_off_by_default(tmp_path: Path) -> None:
    p = pair(tmp_path, "stream")
    assert run(p).status == "succeeded"
    assert prefaults(p) == []


@pytest.mark.parametrize(("rss_kb", "mib"), [(0, 0), (1, 2), (1024, 2), (1025, 4), (2**20, 2048)])
def test_prefault_is_twice_the_rss_in_whole_mib(rss_kb: int, mib: int) -> None:
    assert pagechannel.prefault_mib(rss_kb) == mib
