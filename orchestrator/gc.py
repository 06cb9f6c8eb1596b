"""Leftovers: image dirs, control sockets and their logs, lock files and CRIU or ssh processes
that migrations left on a host and that no live or recoverable migration owns.

One read-only round trip per host (`survey_argv`), a pure parser (`parse`) and a pure rule
(`classify`): a leftover of a migration whose journal here says it ended is garbage; one of a
migration whose controller still runs (its journal is held) or that `recover` must still settle
(unfinished) is kept, since its images may be the only copy of a workload; one of a migration
this controller never journaled is shown but removed only when asked (another controller's?).
A lock file nobody holds is garbage. `remove` deletes garbage, each path checked again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator import journal
from orchestrator.errors import MigrationError
from orchestrator.layout import ID_RE
from orchestrator.transport.ssh import Host

_ID = re.compile(r"([0-9]{8}T[0-9]{6}-[0-9a-f]{6})")
# An evacuation's shared ssh master (session.Shared names them): its socket, log or process.
_EVAC_MASTER = re.compile(r"/images/(ssh-evac-[0-9a-f]{6}-[0-9]+)(?![0-9A-Za-z-])")
SURVEY = r"""wd=$1
echo @@images; ls -A -- "$wd/images" 2>/dev/null
echo @@locks
for f in "$wd"/locks/*.lock; do
  [ -e "$f" ] || continue
  if flock -n "$f" true 2>/dev/null; then echo "free $f"; else echo "held $f"; fi
done
echo @@procs; ps -ww -e -o pid=,args=
"""


@dataclass(frozen=True)
class Leftover:
    host: str
    kind: str  # images | socket | log | lock | process
    what: str  # a path, or "PID ARGS"
    migration: str | None  # the migration id it belongs to, if it names one
    pid: int | None = None


@dataclass(frozen=True)
class Verdict:
    leftover: Leftover
    garbage: bool
    why: str


def survey_argv(workdir: str) -> list[str]:
    return ["sh", "-c", SURVEY, "sh", workdir]


def parse(host: str, workdir: str, stdout: str) -> list[Leftover]:
    """What SURVEY printed, as leftovers: entries under WORKDIR/images, lock files, and the
    processes that name a path under WORKDIR/images (CRIU, ssh masters, rsync)."""
    images = f"{workdir.rstrip('/')}/images"
    out: list[Leftover] = []
    section = ""
    for line in stdout.splitlines():
        if line.startswith("@@"):
            section = line[2:]
            continue
        if not line.strip():
            continue
        if section == "images" and "/" not in line:
            m = _ID.search(line)
            kind = (
                "log"
                if line.endswith(".log")
                else "socket"
                if line.startswith("ssh-")
                else "images"
            )
            out.append(Leftover(host, kind, f"{images}/{line}", m.group(1) if m else None))
        elif section == "locks":
            state, _, path = line.partition(" ")
            if state == "free" and path.startswith(f"{workdir.rstrip('/')}/locks/"):
                out.append(Leftover(host, "lock", path, None))
        elif section == "procs":
            pid, _, args = line.strip().partition(" ")
            if pid.isdigit() and f"{images}/" in args:
                m = _ID.search(args.split(f"{images}/", 1)[1])
                out.append(Leftover(host, "process", f"{pid} {args}", m.group(1) if m else None,
                                    int(pid)))  # fmt: skip
    return out


def classify(
    leftovers: Iterable[Leftover], ended: set[str], open_: set[str], unknown_ok: bool = False
) -> list[Verdict]:
    """Garbage or not, and why (pure). ended: ids whose journal here ended; open_: ids whose
    journal is unfinished (live, or for `recover`)."""
    leftovers = list(leftovers)
    masters = {m.group(1) for x in leftovers if x.kind in ("socket", "process")
               for m in [_EVAC_MASTER.search(x.what)] if m}  # fmt: skip
    out = []
    for x in leftovers:
        m = _EVAC_MASTER.search(x.what) if x.kind == "log" else None
        if x.kind == "lock":
            out.append(Verdict(x, True, "a lock file nobody holds"))
        elif m and m.group(1) not in masters:
            out.append(Verdict(x, True, "an evacuation's ssh master log, its master gone"))
        elif x.migration is None or not ID_RE.match(x.migration):
            out.append(Verdict(x, False, "names no migration: left alone"))
        elif x.migration in open_:
            out.append(Verdict(x, False, f"migration {x.migration} is unfinished: run "
                                         f"`migrate recover {x.migration}`"))  # fmt: skip
        elif x.migration in ended:
            out.append(Verdict(x, True, f"migration {x.migration} has ended"))
        else:
            why = f"migration {x.migration} is not in this controller's journal"
            out.append(Verdict(x, unknown_ok, why + ("" if unknown_ok else " (--unknown)")))
    return out


def survey(host: Host, state_dir: Path, unknown_ok: bool = False) -> list[Verdict]:
    """The verdicts for one host (read-only)."""
    r = host.run(survey_argv(host.config.workdir), mutates=False)
    if not r.ok:
        raise MigrationError(f"{host}: cannot list leftovers: {r.error_line()}")
    ended: set[str] = set()
    open_: set[str] = set()
    for s in journal.summaries(state_dir):
        (ended if s.status is not None else open_).add(s.id)
    return classify(parse(host.name, host.config.workdir, r.stdout), ended, open_, unknown_ok)


def remove(host: Host, verdicts: Iterable[Verdict]) -> list[str]:
    """Remove the garbage on host; what could not be removed, one line each."""
    images = f"{host.config.workdir.rstrip('/')}/images/"
    failed = []
    for v in verdicts:
        x = v.leftover
        if not v.garbage:
            continue
        if x.kind == "process" and x.pid:
            r = host.run(["kill", "-KILL", str(x.pid)])
        elif x.kind == "lock":
            r = host.run(["flock", "-n", x.what, "rm", "-f", "--", x.what])
        elif x.what.startswith(images) and "/" not in x.what[len(images) :]:
            r = host.run(["rm", "-rf", "--", x.what])
        else:
            continue
        if not r.ok:
            failed.append(f"{host.name}: {x.what}: {r.error_line()}")
    return failed
