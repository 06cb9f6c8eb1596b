"""Post-copy and the freeze a busy 256 MiB workload feels under each strategy (issue #5)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod
from tests.labkit import (
    NETAPPS,
    PYTHON,
    counter_pids,
    failing_restore_config,
    migrate,
    on,
    wait_for,
)

pytestmark = pytest.mark.lab

SIZE_MIB = 256
STRATEGIES = ("stopcopy", "stream", "postcopy")


@dataclass
class Writer:
    pid: int
    log: Path

    def ticks(self) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        text = self.log.read_text() if self.log.exists() else ""  # made once memory is full
        for line in text.splitlines():
            parts = line.split()
            assert not line.startswith("CORRUPT"), line  # memory came back wrong
            if len(parts) == 2 and parts[0].isdigit():
                out.append((int(parts[0]), float(parts[1])))
        return out

    def last_tick(self) -> int:
        ticks = self.ticks()
        return ticks[-1][0] if ticks else 0


def start_writer(lab: labmod.Lab, name: str) -> Writer:
    log = lab.dir / "workloads" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    argv = [PYTHON, str(NETAPPS / "memwriter.py"), str(log), str(SIZE_MIB), "MEM" + "MARKER"]
    pid = on(lab, "host-a", 'setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', *argv).strip()
    w = Writer(int(pid), log)
    wait_for(lambda: w.last_tick() >= 100, timeout=60, what="the writer to fill its memory")
    return w


def kill_everywhere(lab: labmod.Lab, log: Path) -> None:
    for host in ("host-a", "host-b"):
        pids = counter_pids(lab, host, log)
        if pids:
            on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


def largest_gap_ms(ticks: list[tuple[int, float]]) -> float:
    return max(b[1] - a[1] for a, b in zip(ticks, ticks[1:], strict=False)) * 1000


@pytest.fixture(scope="module")
def moved(lab: labmod.Lab) -> dict[str, dict[str, Any]]:
    """Each strategy moves its own fresh writer host-a -> host-b once; what each saw."""
    results: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        w = start_writer(lab, f"mem-{strategy}")
        try:
            r = migrate("run", f"pid:{w.pid}", "host-a", "host-b", "--strategy", strategy,
                        "--json", config=lab.config_path)  # fmt: skip
            report = json.loads(r.stdout) if r.stdout.strip() else {}
            before = w.last_tick()
            wait_for(lambda w=w, b=before: w.last_tick() > b + 200, timeout=60,
                     what=f"the writer to tick on after {strategy}")  # fmt: skip
            ticks = w.ticks()
            results[strategy] = {
                "exit": r.returncode,
                "stderr": r.stderr,
                "report": report,
                "ticks": ticks,
                "gap_ms": largest_gap_ms(ticks),
                "on_a": on(lab, "host-a", "ps -ww -e -o args=").count(f"memwriter.py {w.log}"),
            }
        finally:
            kill_everywhere(lab, w.log)
    return results


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_busy_256mib_workload_keeps_its_memory(
    moved: dict[str, dict[str, Any]], strategy: str, record_property: Any
) -> None:
    got = moved[strategy]
    report = got["report"]
    assert got["exit"] == 0, (report, got["stderr"])
    assert report["status"] == "succeeded" and report["strategy"] == strategy
    # Every tick once, in order: the counter (in memory) went on from where it was; and the
    # pages it checks every tick held what it had written (else the log says CORRUPT).
    ticks = [t for t, _ in got["ticks"]]
    assert ticks == list(range(1, len(ticks) + 1))
    assert got["on_a"] == 0  # gone from host-a
    measured = f"largest gap {got['gap_ms']:.0f} ms, downtime {report['downtime_ms']} ms"
    if strategy == "postcopy":
        assert report["postcopy_tail_ms"] is not None and report["postcopy_tail_ms"] >= 0
        assert report["transfer"]["rsync_bytes"] < 16 * 2**20  # pages were not rsynced: pulled
        assert report["transfer"]["postcopy_bytes"] >= SIZE_MIB * 2**20
        assert "pull-pages" in [p["name"] for p in report["phases"]]
        measured += f", post-copy tail {report['postcopy_tail_ms']} ms"
    record_property("measured", f"{SIZE_MIB} MiB, {strategy}: {measured}")


def test_postcopy_freeze_is_clearly_shorter(
    moved: dict[str, dict[str, Any]], record_property: Any
) -> None:
    gaps = {s: round(moved[s]["gap_ms"]) for s in STRATEGIES}
    record_property("measured", f"largest gaps (ms): {gaps}")
    assert all(moved[s]["exit"] == 0 for s in STRATEGIES), gaps
    assert gaps["postcopy"] < 0.7 * gaps["stopcopy"], gaps


def test_postcopy_restore_failure_resumes_the_source(lab: labmod.Lab, tmp_path: Path) -> None:
    w = start_writer(lab, "mem-postcopy-fails")
    try:
        r = migrate("run", f"pid:{w.pid}", "host-a", "host-b", "--strategy", "postcopy",
                    "--json", config=failing_restore_config(lab, tmp_path))  # fmt: skip
        report = json.loads(r.stdout)
        assert r.returncode == 3, r.stdout + r.stderr
        assert report["status"] == "rolled_back"
        assert "criu restore failed on host-b" in report["error"]
        # The source runs on (not stopped), with its memory intact: it keeps ticking.
        before = w.last_tick()
        wait_for(lambda: w.last_tick() > before + 50, what="the writer to tick on host-a")
        assert counter_pids(lab, "host-a", w.log) == [w.pid]
        state = on(lab, "host-a", 'ps -o stat= -p "$1"', str(w.pid)).strip()
        assert state[0] in "SR", state
        # Nothing is left: no copy or lazy-pages daemon on host-b, no criu on host-a, no images.
        for host in ("host-a", "host-b"):
            args = on(lab, host, "ps -ww -e -o args=")
            assert "criu" not in args, (host, args)
            assert not list((lab.host(host).workdir / "images").glob("*")), host
        assert f"memwriter.py {w.log}" not in on(lab, "host-b", "ps -ww -e -o args=")
    finally:
        kill_everywhere(lab, w.log)


def test_auto_is_postcopy_only_when_the_policy_allows(lab: labmod.Lab, tmp_path: Path) -> None:
    config = yaml.safe_load(lab.config_path.read_text())
    config.setdefault("policy", {})["allow_postcopy"] = True
    allowing = tmp_path / "allow-postcopy.yaml"
    allowing.write_text(yaml.safe_dump(config))
    pid = on(lab, "host-a", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").strip()
    try:
        runs = [
            (
                migrate(
                    "run", f"pid:{pid}", "host-a", "host-b", "--dry-run", "--json", config=path
                ),
                expected,
            )  # fmt: skip
            for path, expected in ((lab.config_path, "stream"), (allowing, "postcopy"))
        ]
    finally:
        on(lab, "host-a", f"kill -KILL {pid}", check=False)
    for r, expected in runs:
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        assert report["strategy"] == expected, report
        said = {"stream": "auto: stream", "postcopy": "auto: post-copy"}[expected]
        assert any(n.startswith(said) for n in report["notes"]), report
