"""A recording fake Host for unit tests of pure logic (never the proof that CRIU works), and
the two-host context the runner tests start from.

It subclasses the real Host and replaces only the wire: quoting and the dry-run gate are real.
Replies are keyed on the argv (its words, or the constant script of an `sh -c SCRIPT`), never
on substrings of a joined shell line; the log keeps each command's argv.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import facts, strategies, workloadcheck
from orchestrator.config import HostConfig, Policy, WorkloadConfig
from orchestrator.criu import background, manifest
from orchestrator.journal import Journal
from orchestrator.plan import Context, Plan
from orchestrator.runtimes import procs
from orchestrator.runtimes.process import ProcessRuntime
from orchestrator.transport.ssh import Host, RemoteLock, Result

Match = Callable[[list[str]], bool]
Reply = Callable[[list[str]], Result | None]
ID = "20261203T000000-abcdef"


def words(*prefix: str) -> Match:
    """argv starts with these words."""
    return lambda argv: argv[: len(prefix)] == list(prefix)


def script(text: str) -> Match:
    """argv is `sh -c TEXT sh ...` for this constant script."""
    return lambda argv: argv[:3] == ["sh", "-c", text]


def criu(verb: str) -> Match:
    """argv runs `criu VERB` (directly, or as the command a wrapper script runs)."""
    return lambda argv: any(a == "criu" and argv[i + 1 : i + 2] == [verb]
                            for i, a in enumerate(argv))  # fmt: skip


def has(word: str) -> Match:
    """argv has this exact word (e.g. a path)."""
    return lambda argv: word in argv


def inner(argv: list[str]) -> list[str]:
    """The command a wrapper script runs (from `criu` on), else argv itself."""
    return argv[argv.index("criu") :] if "criu" in argv else argv


@dataclass
class FakeHost(Host):
    log: list[tuple[str, list[str]]] = field(default_factory=list)  # share one list: order
    replies: list[Reply] = field(default_factory=list)
    watchers: list[Callable[[list[str]], None]] = field(default_factory=list)  # see all first
    lacking: set[str] = field(default_factory=set)  # CRIU features and programs it has not

    def on(self, match: Match, out: str = "", err: str = "", code: int = 0) -> None:
        """Answer commands that match, before the replies given earlier."""
        self.replies.insert(0, lambda argv: Result(self.name, argv, code, out, err)
                            if match(argv) else None)  # fmt: skip

    def answer(self, reply: Reply) -> None:
        self.replies.insert(0, reply)

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def lock(self, path: str, holder: str) -> RemoteLock:
        self.log.append((self.name, ["lock", path]))
        return _FakeLock(self, path)

    def _execute(self, argv: list[str], line: str, timeout: float) -> Result:
        argv = manifest.pushed(argv)  # the final push is rsync inside a checksumming script
        self.log.append((self.name, argv))
        for watch in self.watchers:
            watch(argv)
        for reply in self.replies:
            r = reply(argv)
            if r is not None:
                return r
        return Result(self.name, argv, 0)


class _FakeLock(RemoteLock):
    def __init__(self, host: FakeHost, path: str) -> None:
        self.host, self.path = host, path

    def ensure(self) -> bool:
        return False

    def release(self) -> None:
        self.host.log.append((self.host.name, ["unlock", self.path]))


PS = "100 1 Ss 2048 /bin/sh /w.sh\n101 100 S 1024 sleep 1\n"
# What workloadcheck._SCRIPT prints for pid 100's tree: root's, no locks, no TCP, one namespace.
TREE = (
    "task 100\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nuserns user:[1]\nfd 0 /dev/null\nmnt 24\n"
    "CapEff:\t000001ffffffffff\nuserns-self user:[1]\nmntns mnt:[2] mnt:[2]\n"
    "netns net:[3] net:[3]\n[mountinfo]\n[tcp]\n[veth]\n[end]\n"
)


def healthy_host(host: FakeHost, restored: list[bool]) -> None:
    """A host where CRIU 4.2.1 passes its check and pid 100's tree runs (on b: once a restore
    ran, even a failed one)."""
    source = host.name == "a"
    host.on(words("criu", "--version"), "Version: 4.2.1\n")
    host.on(words("ps", "-o", "stat="), "S\n")
    host.on(script(procs._NS_SCRIPT), "NSpid:\t100\npid same\nmnt same\nnet same\n")
    host.answer(lambda a: Result(host.name, a, 0, facts_output(host, a))
                if script(facts.SCRIPT)(a) else None)  # fmt: skip
    host.on(lambda a: a[:1] == ["base64"] and a[-1].endswith("restored.pid"), "MTAwCg==")
    host.on(lambda a: a[:1] == ["cat"] and a[-1].endswith(".log"),
            "(0.1) Error (criu/x.c:1): it broke\n")  # fmt: skip
    host.on(script(workloadcheck._SCRIPT), TREE)
    host.on(script(workloadcheck._CPU_DUMP), "Q1BVaW5mbw==\n")  # (its check answers 0: a match)
    host.on(script(background._START), "ready\n")  # CRIU in the background: ready at once
    host.on(script(background._WAIT), "0\n")  # ...and ended well when asked
    host.answer(lambda a: Result(host.name, a, 0, PS if source or restored else "1 0 Ss 100 sshd\n")
                if words("ps", "-ww", "-e")(a) else None)  # fmt: skip

    def restore(argv: list[str]) -> None:
        if criu("restore")(argv):
            restored.append(True)

    host.watchers.append(restore)


def facts_output(host: FakeHost, argv: list[str]) -> str:
    """What facts.SCRIPT prints on a healthy host: CRIU 4.2.1 passing its check, rsync, room
    (none if "df" is in host.lacking: a workdir under /proc), big pipes, every feature and
    program asked for but those in host.lacking."""
    n = int(argv[6])
    features, commands = argv[7 : 7 + n], argv[7 + n :]

    def section(name: str, text: str, rc: int = 0) -> str:
        return f"\n{facts.BEGIN} {name}\n{text}\n{facts.END} {name} {rc}\n"

    def rcs(names: list[str]) -> str:
        return "\n".join(f"{x} {1 if x in host.lacking else 0}" for x in names)

    return (section("criu-version", "Version: 4.2.1")
            + section("criu-check", "Looks good.", 1 if "criu check" in host.lacking else 0)
            + section("rsync", "rsync  version 3.2.7  protocol version 31")
            + section("df", "proc 0 0 0 - /proc" if "df" in host.lacking
                      else "/dev/x 1000 10 99999999 1% /")
            + section("pipe-max-size", str(8 << 20)) + section("features", rcs(features))
            + section("commands", rcs(commands)) + f"\n{facts.DONE}\n")  # fmt: skip


def fail(host: FakeHost, match: Match) -> None:
    host.on(match, err="Error (criu/x.c:1): it broke", code=1)


@dataclass
class Pair:
    """Two fake hosts, a context for a stop-copy of pid 100 from a to b, and its journal."""

    ctx: Context
    journal: Journal
    log: list[tuple[str, list[str]]]

    @property
    def src(self) -> FakeHost:
        return self.ctx.src  # type: ignore[return-value]

    @property
    def dst(self) -> FakeHost:
        return self.ctx.dst  # type: ignore[return-value]


def pair(tmp_path: Path, strategy: str = "stopcopy", dry_run: bool = False,
         policy: Policy | None = None, workload: WorkloadConfig | None = None) -> Pair:  # fmt: skip
    log: list[tuple[str, list[str]]] = []
    a = HostConfig("a", "198.18.0.1", "/k", "/kh", workdir="/wa")
    b = HostConfig("b", "198.18.0.2", "/k", "/kh", workdir="/wb")
    wl = workload or WorkloadConfig("w", pid=100)
    policy = policy or Policy(retries=2, retry_deadline=5)
    plan = Plan(ID, wl, a, b, strategy, policy, dry_run=dry_run)
    restored: list[bool] = []
    src = FakeHost(a, policy, log=log, dry_run=dry_run)
    dst = FakeHost(b, policy, log=log, dry_run=dry_run)
    healthy_host(src, restored)
    healthy_host(dst, restored)
    ctx = Context.for_plan(plan, strategies.get(strategy), src, dst, ProcessRuntime(wl))
    return Pair(ctx, Journal(tmp_path, ID), log)


def verbs(log: Sequence[tuple[str, list[str]]]) -> list[str]:
    """The commands that change something, each as `host: first words`."""
    out = []
    for h, argv in log:
        cmd = inner(argv)
        if cmd[:2] in (["criu", "restore"], ["criu", "dump"], ["criu", "pre-dump"]):
            out.append(f"{h}: criu {cmd[1]}")
        elif argv[:1] == ["ssh"] and "ControlMaster=yes" in argv:
            out.append(f"{h}: ssh master")
        elif argv[:1] == ["sh"] and "ControlMaster=yes" in argv:
            out.append(f"{h}: ssh master")
        elif argv[:1] == ["ssh"] and argv[-3:-1] == ["-O", "exit"]:
            out.append(f"{h}: ssh close")
        elif argv[:1] == ["rsync"] and argv[1:2] == ["-a"]:
            out.append(f"{h}: rsync {argv[-1]}")
        elif argv[:1] == ["kill"] or argv[:2] == ["rm", "-rf"]:
            out.append(f"{h}: {' '.join(argv)}")
        elif argv[:2] == ["sh", "-c"] and argv[2].startswith("umask 077"):
            out.append(f"{h}: mkdir {argv[-1]}")
    return out
