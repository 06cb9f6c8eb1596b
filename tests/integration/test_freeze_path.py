"""Nothing but CRIU inside the freeze (issue #15), as the kernel sees it: every program started
on either host between the workload's last tick before the move and its first after it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.execwatch import ExecWatch, monotonic_of
from tests.labkit import NETAPPS, PYTHON, counter_pids, migrate, on, wait_for

pytestmark = pytest.mark.lab


def _ticks(log: Path) -> list[float]:
    text = log.read_text() if log.exists() else ""
    return [float(p[1]) for p in (ln.split() for ln in text.splitlines()) if len(p) == 2]


@pytest.mark.parametrize("strategy", ["stopcopy", "stream", "postcopy"])
def test_nothing_but_criu_starts_inside_the_freeze(lab: labmod.Lab, strategy: str) -> None:
    log = lab.dir / "workloads" / f"freeze-{strategy}.log"
    log.parent.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    argv = [PYTHON, str(NETAPPS / "memwriter.py"), str(log), "8", "FREEZE"]
    pid = on(lab, "host-a", 'setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', *argv).strip()
    hosts = {lab.host(h).ns_inode("pid"): h for h in ("host-a", "host-b")}
    try:
        wait_for(lambda: len(_ticks(log)) > 50, timeout=60, what="the writer to tick")
        watch = ExecWatch(set(hosts)).start()
        try:
            r = migrate("run", f"pid:{pid}", "host-a", "host-b", "--strategy", strategy,
                        "--json", config=lab.config_path)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            moved = len(_ticks(log))
            wait_for(lambda: len(_ticks(log)) > moved + 20, timeout=60, what="ticks after")
        finally:
            watch.stop()
        assert not watch.lost, f"the kernel dropped process events: {watch.lost}"
        ticks = _ticks(log)
        gap, last, first = max((b - a, a, b) for a, b in zip(ticks, ticks[1:], strict=False))
        # the freeze: from the last tick before the move until the restore's CRIU has resumed
        # the workload and ended (post-copy's first tick can come later: pages still arrive)
        start, end = monotonic_of(last), monotonic_of(first)
        restores = [e for e in watch.within(start, end) if _criu(e.argv) and "restore" in e.argv]
        # the watch works: the restore (and post-copy's lazy-pages) started inside the freeze
        assert restores, (gap, json.loads(r.stdout)["freeze"])
        end = min(end, watch.exits.get(restores[-1].pid, end))
        inside = watch.within(start, end)
        others = [e for e in inside if not any(map(_criu, (e.argv, *e.ancestry)))]
        seen = [(hosts[e.pid_ns], e.argv[:3] or "(gone before it was read)",
                 [a[:2] for a in e.ancestry]) for e in others]  # fmt: skip
        assert not others, f"{strategy}: {gap * 1000:.0f} ms freeze: {seen}"

    finally:
        for host in ("host-a", "host-b"):
            pids = counter_pids(lab, host, log)
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


def _criu(argv: tuple[str, ...]) -> bool:
    """CRIU itself (the programs CRIU starts, e.g. iptables to probe the kernel, are its own)."""
    return bool(argv) and os.path.basename(argv[0]) == "criu"
