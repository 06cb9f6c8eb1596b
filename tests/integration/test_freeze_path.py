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
        # the freeze: the gap in the workload's ticks around the restore's CRIU (found by the
        # restore, not as the largest gap: on a loaded machine another gap can be larger)
        restores = [e for e in watch.within(0, float("inf"))
                    if _criu(e.argv) and "restore" in e.argv]  # fmt: skip
        # the watch works: it saw the restore start
        assert len(restores) == 1, (restores, json.loads(r.stdout)["freeze"])
        ticks = [monotonic_of(t) for t in _ticks(log)]
        at = restores[0].at
        start = max(t for t in ticks if t < at)
        end = min(t for t in ticks if t > at)
        gap = end - start
        # ...until that CRIU has resumed the workload and ended (post-copy's first tick can
        # come later: pages still arrive)
        end = min(end, watch.exits.get(restores[0].pid, end))
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
