"""Phase and undo ordering of the stop-copy strategy, with a recording fake host."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import runner, strategies
from orchestrator.config import HostConfig, Policy, WorkloadConfig
from orchestrator.journal import Journal
from orchestrator.plan import Context, Plan
from orchestrator.runtimes.process import ProcessRuntime
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import FakeHost

PS = "100 1 Ss 2048 /bin/sh /w.sh\n101 100 S 1024 sleep 1\n"


def script(name: str, fail: str | None) -> list:
    restored = []  # the destination's table gains the tree once a restore ran (even a failed one)

    def respond(argv: list[str]) -> Result | None:
        line = " ".join(argv)
        if "criu restore" in line:
            restored.append(True)
        if fail and fail in line:
            return Result(name, argv, 1, "", "Error (criu/x.c:1): it broke")
        if argv[:2] == ["criu", "--version"]:
            return Result(name, argv, 0, "Version: 4.2.1\n")
        if argv[:3] == ["ps", "-ww", "-e"]:
            return Result(name, argv, 0, PS if name == "a" or restored else "1 0 Ss 100 sshd\n")
        if argv[:3] == ["ps", "-o", "stat="]:
            return Result(name, argv, 0, "S\n")
        if argv[0] == "sh" and "NSpid" in argv[2]:
            return Result(name, argv, 0, "NSpid:\t100\npid same\nmnt same\nnet same\n")
        if argv[0] == "sh" and "df -Pk" in argv[2]:
            return Result(name, argv, 0, "/dev/x 1000 10 99999999 1% /\n")
        if argv[0] == "cat" and argv[-1].endswith("restored.pid"):
            return Result(name, argv, 0, "100\n")
        if argv[0] == "cat" and argv[-1].endswith(".log"):
            return Result(name, argv, 0, "(0.1) Error (criu/x.c:1): it broke\n")
        return None

    return [respond]


def make(tmp_path: Path, fail: str | None = None, dry_run: bool = False):
    log: list[tuple[str, str]] = []
    a = HostConfig("a", "198.18.0.1", "/k", "/kh", workdir="/wa")
    b = HostConfig("b", "198.18.0.2", "/k", "/kh", workdir="/wb")
    wl = WorkloadConfig("w", pid=100)
    plan = Plan("ID", wl, a, b, "stopcopy", Policy(retries=2, retry_deadline=5), dry_run=dry_run)
    src = FakeHost(a, Policy(), log=log, responders=script("a", fail), dry_run=dry_run)
    dst = FakeHost(b, Policy(), log=log, responders=script("b", fail), dry_run=dry_run)
    ctx = Context(plan=plan, src=src, dst=dst, runtime=ProcessRuntime(wl))  # type: ignore[arg-type]
    journal = Journal(tmp_path, "ID")
    return ctx, journal, log


def mutating(log: list[tuple[str, str]]) -> list[str]:
    """The commands that change something, shortened to their first words."""
    out = []
    for h, c in log:
        if "criu restore" in c:
            out.append(f"{h}: criu restore")
        elif "ControlMaster=yes" in c:
            out.append(f"{h}: ssh master")
        elif c.startswith("ssh") and "-O exit" in c:
            out.append(f"{h}: ssh close")
        elif c.startswith(("criu dump", "rsync -a", "kill", "rm -rf", "sh -c umask")):
            out.append(f"{h}: {' '.join(c.split()[:4])}")
    return out


def test_success_runs_phases_in_order_and_kills_source_last(tmp_path: Path) -> None:
    ctx, journal, log = make(tmp_path)
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "succeeded" and report.exit_code == 0
    assert [p.name for p in report.phases] == [
        "preflight", "prepare", "dump", "transfer", "restore", "verify", "confirm",
    ]  # fmt: skip
    order = mutating(log)
    # before the freeze: private image dirs on both hosts, the source's ssh link to b
    assert order[:3] == ["a: sh -c umask 077", "b: sh -c umask 077", "a: ssh master"]
    assert [o for o in order if "criu" in o or "rsync" in o or "kill" in o] == [
        "a: criu dump -t 100",
        "a: rsync -a --partial --stats",
        "b: criu restore",
        "a: kill -KILL 100 101",
    ]
    assert order[-2:] == ["a: rm -rf -- /wa/images/ID", "b: rm -rf -- /wb/images/ID"]
    assert "a: ssh close" in order
    assert ("a", "lock /wa/locks/pid-100.lock") in log and log[-1] == (
        "a",
        "unlock /wa/locks/pid-100.lock",
    )
    assert any("ControlPath=/wa/images/ssh-ID" in c for h, c in log if c.startswith("rsync"))
    assert report.restored_pid == 100 and report.downtime_ms is not None
    events = [(e["event"], e.get("name"), e.get("state")) for e in journal.read()]
    assert events[0][0] == "start" and events[-1][0] == "end"
    assert ("phase", "dump", "begin") in events


def test_restore_failure_rolls_back_newest_first(tmp_path: Path) -> None:
    ctx, journal, log = make(tmp_path, fail="criu restore")
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "rolled_back" and report.exit_code == 3
    assert "criu restore failed on b" in (report.error or "")
    assert report.criu_errors == ["Error (criu/x.c:1): it broke"]
    assert [p.name for p in report.phases][-3:] == ["undo restore", "undo dump", "undo prepare"]
    order = mutating(log)
    after = order[order.index("b: criu restore") + 1 :]
    # the destination copy is removed before the source resumes; the source is never killed
    assert after[0] == "b: kill -KILL 100 101"
    assert after.index("a: kill -CONT 100 101") < after.index("b: rm -rf -- /wb/images/ID")
    assert "a: kill -KILL 100 101" not in order
    assert "a: ssh close" in after
    assert [e["event"] for e in journal.read()].count("undo") == 3


def test_preflight_refusal_changes_nothing(tmp_path: Path) -> None:
    ctx, journal, log = make(tmp_path, fail="criu check")
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "failed" and report.exit_code == 1
    assert "criu check` failed" in (report.error or "")
    assert mutating(log) == []


@pytest.mark.parametrize("fail", ["criu dump", "rsync -a"])
def test_failure_before_restore_resumes_source(tmp_path: Path, fail: str) -> None:
    ctx, journal, log = make(tmp_path, fail=fail)
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "rolled_back"
    order = mutating(log)
    assert "a: kill -CONT 100 101" in order and "a: kill -KILL 100 101" not in order
    assert "b: criu restore" not in order


def test_dry_run_records_and_changes_nothing(tmp_path: Path) -> None:
    ctx, journal, log = make(tmp_path, dry_run=True)
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "succeeded"
    assert mutating(log) == []
    assert any(c.startswith("a$ criu dump") for c in ctx.src.planned)


def test_a_bug_in_a_phase_still_rolls_back(tmp_path: Path) -> None:
    ctx, journal, log = make(tmp_path)

    def boom(argv: list[str]) -> Result | None:
        if argv[:2] == ["rsync", "-a"]:
            raise ValueError("a bug")
        return None

    ctx.src.responders.insert(0, boom)  # type: ignore[attr-defined]
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "rolled_back" and report.error == "a bug"
    assert "a: kill -CONT 100 101" in mutating(log)


def test_workload_that_exited_is_named(tmp_path: Path) -> None:
    ctx, journal, log = make(tmp_path, fail="criu dump")

    def gone(argv: list[str]) -> Result | None:
        if argv[:3] == ["ps", "-o", "stat="] and any("criu dump" in c for _, c in log):
            return Result("a", argv, 1, "")
        return None

    ctx.src.responders.insert(0, gone)  # type: ignore[attr-defined]
    report = runner.run(ctx, strategies.phases("stopcopy"), journal)
    assert report.status == "failed" and report.exit_code == 1
    assert "exited by itself on a during dump" in (report.error or "")
    assert any("first error: criu dump failed" in n for n in report.notes)
