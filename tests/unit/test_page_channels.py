"""Stream and post-copy with fake hosts: the page channel's commands and retries, the lazy
dump's abort, and each way pulling pages can fail after the point of no return."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import phases, runner
from orchestrator.criu import background
from orchestrator.phases.pageserver import _FREE
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import ID, Pair, criu, fail, inner, pair, script, verbs, words


def run(p: Pair):  # type: ignore[no-untyped-def]
    return runner.run(p.ctx, phases.build(p.ctx.strategy), p.journal)


def forwards(p: Pair) -> list[list[str]]:
    return [argv[-4:] for _, argv in p.log if argv[:1] == ["ssh"] and "-O" in argv
            and argv[argv.index("-O") + 1] in ("forward", "cancel")]  # fmt: skip


def test_stream_pages_go_to_a_page_server_through_the_link(tmp_path: Path) -> None:
    p = pair(tmp_path, "stream")
    report = run(p)
    assert report.status == "succeeded", report.error
    server = next(inner(a) for h, a in p.log if h == "b" and criu("page-server")(a))
    port = server[server.index("--port") + 1]
    assert server[server.index("--address") + 1] == "127.0.0.1"
    dump = next(inner(a) for h, a in p.log if h == "a" and criu("dump")(a))
    assert dump[dump.index("--page-server") :][:5] == ["--page-server", "--address",
                                                      "127.0.0.1", "--port", port]  # fmt: skip
    assert forwards(p)[0] == ["forward", "-L", f"127.0.0.1:{port}:127.0.0.1:{port}", "198.18.0.2"]


def test_a_page_server_that_cannot_start_is_retried_then_refused(tmp_path: Path) -> None:
    p = pair(tmp_path, "stream")
    fail(p.dst, criu("page-server"))
    report = run(p)
    assert report.status == "rolled_back" and "cannot open the page channel" in (report.error or "")
    assert sum(1 for h, a in p.log if h == "b" and criu("page-server")(a)) == 3
    assert "b: criu dump" not in verbs(p.log) and "a: criu dump" not in verbs(p.log)


def test_a_busy_port_on_the_source_is_skipped(tmp_path: Path) -> None:
    p = pair(tmp_path, "postcopy")
    tries: list[str] = []

    def busy_once(argv: list[str]) -> Result | None:
        if script(_FREE)(argv) and not tries:
            tries.append(argv[-1])
            return Result("a", argv, 1, "", f"port {argv[-1]} is in use")
        return None

    p.src.answer(busy_once)
    report = run(p)
    assert report.status == "succeeded", report.error
    [fwd] = [f for f in forwards(p) if f[0] == "forward"]
    assert fwd[1] == "-R" and tries[0] not in fwd[2]


def test_post_copy_commits_at_its_lazy_restore(tmp_path: Path) -> None:
    p = pair(tmp_path, "postcopy")
    report = run(p)
    assert report.status == "succeeded"
    assert any("no rollback is possible" in n for n in report.notes)
    daemon = next(inner(a) for h, a in p.log if h == "b" and criu("lazy-pages")(a))
    dump = next(inner(a) for h, a in p.log if h == "a" and criu("dump")(a))
    port = dump[dump.index("--lazy-pages") + 4]
    assert daemon[daemon.index("--port") + 1] == port
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
    p.ctx.plan = __import__("dataclasses").replace(
        p.ctx.plan, policy=__import__("dataclasses").replace(p.ctx.plan.policy,
                                                             postcopy_deadline=1.0))  # fmt: skip
    p.dst.on(script(background._WAIT), dst_wait)
    p.src.on(script(background._WAIT), src_wait)
    report = run(p)
    assert report.status == "stranded" and why in (report.error or "")
    assert "a: kill -KILL 100 101" not in verbs(p.log)  # the source keeps its pages
    assert not any(v.startswith("a: kill -CONT") for v in verbs(p.log))


def test_a_failed_lazy_restore_aborts_the_lazy_dump(tmp_path: Path) -> None:
    """Before the destination resumed: the lazy dump is made to fail (its page channel gets a
    truncated request), which lets the source run on; nothing is restored from images."""
    p = pair(tmp_path, "postcopy")
    fail(p.dst, criu("restore"))
    p.src.answer(lambda a: Result("a", a, 0, f"100 1 Ss 2048 criu dump -D /wa/images/{ID}\n")
                 if words("ps", "-ww", "-e")(a) and not aborted else None)  # fmt: skip
    aborted: list[bool] = []
    p.src.watchers.append(lambda a: aborted.append(True) if a[:2] == ["bash", "-c"] else None)
    report = run(p)
    assert report.status in ("rolled_back", "failed"), report.error
    assert aborted, "the lazy dump was aborted through its page channel"
    assert [x.name for x in report.phases if x.name.startswith("undo")][:2] == [
        "undo lazy-restore", "undo lazy-dump",
    ]  # fmt: skip
    assert "a: criu restore" not in verbs(p.log)
