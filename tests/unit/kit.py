"""Shared helpers of the unit tests of the runner and the strategies: a stop-copy migration of
pid 100 from host a to host b on recording fake hosts (`make`), and the commands that change
something, shortened (`mutating`). Import from here, not from a test module."""

from __future__ import annotations

from pathlib import Path

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
