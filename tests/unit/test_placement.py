"""Pure logic of evacuation: placement, where workloads are, metrics text, progress rounds."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import metrics
from orchestrator.config import ConfigError, load
from orchestrator.evacuate import exit_code, select
from orchestrator.location import whereabouts, workloads_on
from orchestrator.placement import Bin, Item, mem_available_kb, place
from orchestrator.progress import round_of
from orchestrator.report import Report
from orchestrator.session import open_session

MiB = 1024


def test_biggest_first_each_where_most_room() -> None:
    items = [Item("small", 10 * MiB), Item("big", 50 * MiB), Item("mid", 30 * MiB)]
    bins = [Bin("b", free_kb=10_000 * MiB, capacity_kb=60 * MiB), Bin("c", 10_000 * MiB)]
    p = place(items, bins)
    # c has no capacity limit: its free memory is its room, so everything goes there first...
    assert p.assigned == {"big": "c", "mid": "c", "small": "c"}
    bins = [Bin("b", 10_000 * MiB, capacity_kb=60 * MiB), Bin("c", 10_000 * MiB, 60 * MiB)]
    p = place(items, bins)
    # ...but with capacities the biggest goes first and the others fill the emptier host.
    assert p.assigned == {"big": "b", "mid": "c", "small": "c"}
    assert not p.unplaced
    assert [b.placed for b in p.bins] == [["big"], ["mid", "small"]]


def test_capacity_forces_a_split_and_is_never_exceeded() -> None:
    items = [Item(f"w{i}", 26 * MiB) for i in range(4)]
    bins = [Bin("host-b", 8000 * MiB, 60 * MiB), Bin("host-c", 8000 * MiB, 60 * MiB)]
    p = place(items, bins)
    assert sorted(p.assigned.values()) == ["host-b", "host-b", "host-c", "host-c"]
    for b in p.bins:
        assert b.used_kb <= b.capacity_kb  # type: ignore[operator]


def test_what_already_runs_counts_against_capacity() -> None:
    bins = [Bin("b", 8000 * MiB, capacity_kb=60 * MiB, used_kb=40 * MiB), Bin("c", 100 * MiB)]
    p = place([Item("w", 30 * MiB)], bins)
    assert p.assigned == {"w": "c"}


def test_free_memory_limits_too_and_the_unplaced_say_why() -> None:
    bins = [Bin("b", free_kb=20 * MiB, capacity_kb=None), Bin("c", 5 * MiB, 500 * MiB)]
    p = place([Item("huge", 100 * MiB), Item("ok", 15 * MiB)], bins)
    assert p.assigned == {"ok": "b"}
    assert "needs 100 MiB" in p.unplaced["huge"] and "b 20 MiB" in p.unplaced["huge"]
    assert "no destination" in place([Item("x", 1)], []).unplaced["x"]


def test_ties_go_by_name() -> None:
    p = place([Item("w", MiB)], [Bin("z", 100 * MiB), Bin("a", 100 * MiB)])
    assert p.assigned == {"w": "a"}


def test_mem_available() -> None:
    text = "MemTotal:  8000000 kB\nMemFree:  100 kB\nMemAvailable:    4123456 kB\n"
    assert mem_available_kb(text) == 4123456
    assert mem_available_kb("MemTotal: 1 kB\n") == 0


def _config(tmp_path: Path, workloads: dict, hosts_extra: dict | None = None) -> Path:
    key = tmp_path / "k"
    key.write_text("k")
    hosts = {
        h: {"address": f"198.18.0.{i}", "key": str(key), "known_hosts": str(key)}
        for i, h in enumerate(("host-a", "host-b", "host-c"), 1)
    }
    for h, extra in (hosts_extra or {}).items():
        hosts[h].update(extra)
    path = tmp_path / "migrate.yaml"
    path.write_text(yaml.safe_dump({"hosts": hosts, "workloads": workloads,
                                    "state_dir": str(tmp_path / "state")}))  # fmt: skip
    return path


def test_config_host_and_capacity(tmp_path: Path) -> None:
    cfg = load(
        _config(tmp_path, {"w": {"pid": 10, "host": "host-a"}}, {"host-b": {"capacity_mb": 64}})
    )
    assert cfg.workloads["w"].host == "host-a" and cfg.host("host-b").capacity_mb == 64
    with pytest.raises(ConfigError, match=r"workloads.w.host: unknown host 'host-x'"):
        load(_config(tmp_path, {"w": {"pid": 10, "host": "host-x"}}))
    with pytest.raises(ConfigError, match=r"hosts.host-b.capacity_mb: must be a positive"):
        load(_config(tmp_path, {}, {"host-b": {"capacity_mb": 0}}))


def test_the_journal_says_where_a_workload_went(tmp_path: Path) -> None:
    cfg = load(_config(tmp_path, {
        "moved": {"pid": 10, "host": "host-a"},
        "stayed": {"pid": 11, "host": "host-a"},
        "rolled": {"pidfile": "/run/r.pid", "host": "host-a"},
        "nowhere": {"pid": 12},
    }))  # fmt: skip
    jdir = tmp_path / "state" / "journal"
    jdir.mkdir(parents=True)

    def journal(mid: str, wl: str, dst: str, status: str, restored: int) -> None:
        events = [
            {"t": float(mid[-1]), "event": "start", "id": mid, "workload": wl,
             "source": "host-a", "destination": dst, "strategy": "stopcopy"},
            {"t": 2.0, "event": "phase", "name": "verify", "restored_pid": restored},
            {"t": 3.0, "event": "end", "status": status},
        ]  # fmt: skip
        (jdir / f"{mid}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    journal("m1", "moved", "host-b", "succeeded", 77)
    journal("m2", "rolled", "host-c", "rolled_back", 0)
    where = whereabouts(cfg)
    assert where["moved"][0] == "host-b" and where["moved"][1].pid == 77
    assert where["rolled"][0] == "host-a" and "nowhere" not in where
    assert sorted(workloads_on(cfg, "host-a")) == ["rolled", "stayed"]
    # `run moved host-b ...` looks for it under its pid there; from host-a, under the config's.
    # (A fixed strategy: `auto` would ask the hosts which one they can do.)
    session = open_session(cfg, "moved", "host-b", "host-a", strategy="stopcopy")
    assert session.plan.workload.pid == 77
    session = open_session(cfg, "moved", "host-a", "host-c", strategy="stopcopy")
    assert session.plan.workload.pid == 10
    journal("m3", "moved", "host-a", "succeeded", 78)  # and back again: the last one wins
    assert workloads_on(cfg, "host-a")["moved"].pid == 78
    assert list(select(cfg, "host-a", ["moved"])) == ["moved"]
    with pytest.raises(
        ConfigError, match=r"--only nowhere: it is not on host-a \(it is on no host"
    ):
        select(cfg, "host-a", ["nowhere"])
    with pytest.raises(ConfigError, match="--only ghost: no such workload"):
        select(cfg, "host-a", ["ghost"])


def _report(name: str, status: str, downtime: int | None = 120) -> Report:
    return Report(id="x", workload=name, source="host-a", destination='host-"b"\n',
                  strategy="stopcopy", status=status, downtime_ms=downtime, total_ms=2500,
                  bytes_transferred=4096)  # fmt: skip


def test_metrics_parse_as_prometheus_text_and_replace_atomically(tmp_path: Path) -> None:
    reports = [_report("w1", "succeeded"), _report("w2", "failed", None)]
    target = tmp_path / "migrate.prom"
    target.write_text("old")
    metrics.write(target, reports)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["migrate.prom"]  # no temp file left
    families = {f.name: f for f in text_string_to_metric_families(target.read_text())}
    dur = {s.labels["workload"]: s.value for s in families["migrate_duration_seconds"].samples}
    assert dur == {"w1": 2.5, "w2": 2.5}
    down = families["migrate_downtime_seconds"].samples
    assert [(s.labels["workload"], s.value) for s in down] == [("w1", 0.12)]
    assert down[0].labels["destination"] == 'host-"b"\n'  # escaped, parsed back
    ok = {s.labels["workload"]: s.value for s in families["migrate_succeeded"].samples}
    assert ok == {"w1": 1.0, "w2": 0.0}
    outcome = [(s.labels["workload"], s.labels["outcome"]) for s in
               families["migrate_outcome"].samples if s.value == 1]  # fmt: skip
    assert outcome == [("w1", "succeeded"), ("w2", "failed")]
    assert families["migrate_transferred_bytes"].samples[0].value == 4096


def test_metrics_path_is_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        metrics.check_path(tmp_path / "nope" / "m.prom")
    with pytest.raises(ConfigError, match="is a directory"):
        metrics.check_path(tmp_path)


def test_exit_code_is_zero_only_if_all_moved() -> None:
    assert exit_code([_report("a", "succeeded"), _report("b", "succeeded")]) == 0
    assert exit_code([_report("a", "succeeded"), _report("b", "rolled_back")]) == 3
    assert exit_code([_report("a", "failed"), _report("b", "rolled_back")]) == 1
    assert exit_code([_report("a", "failed"), _report("b", "stranded")]) == 4


class _Ctx:
    round: int | None = None
    rounds: list[object] = []


def test_round_from_context_or_phase_name() -> None:
    ctx = _Ctx()
    assert round_of("dump", ctx) is None  # type: ignore[arg-type]
    assert round_of("precopy round 3", ctx) == 3  # type: ignore[arg-type]
    ctx.rounds = ["r1", "r2", "r3", "r4"]  # pre-copy appends one Round per round done
    assert round_of("precopy", ctx) == 4  # type: ignore[arg-type]
    ctx.round = 2
    assert round_of("precopy", ctx) == 2  # type: ignore[arg-type]


def test_live_view_shows_phase_round_bytes_and_outcome() -> None:
    from rich.console import Console

    from orchestrator.progress import Event, LiveView

    view = LiveView(["w1", "w2"])
    t = time.monotonic() - 2.0  # began two seconds ago: 1.5 MiB/s
    view(Event("w1", "host-b", "precopy round 2", None, 3 * 2**20, round=2, t=t))
    view(Event("w2", "host-c", "end", "rolled_back", 0, t=100.0))
    console = Console(record=True, width=120)
    console.print(view.render())
    text = console.export_text()
    row1 = next(ln for ln in text.splitlines() if ln.startswith("w1"))
    assert "host-b" in row1 and "precopy round 2" in row1 and "3.0 MiB" in row1
    assert "1.5 MiB/s" in row1 and "running" in row1 and " 2 " in row1
    row2 = next(ln for ln in text.splitlines() if ln.startswith("w2"))
    assert "rolled_back" in row2 and "0.0s" in row2


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--parallel", "0"], "--parallel must be at least 1, not 0"),
        (["--to", "host-a"], "--to host-a: the destination cannot be the host being evacuated"),
        (["--to", "host-x"], "unknown host 'host-x'"),
        (["--only", "ghost"], "--only ghost: no such workload"),
        (["--metrics-file", "/nonexistent/m.prom"], "directory /nonexistent does not exist"),
    ],
)
def test_evacuate_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expect: str
) -> None:
    from orchestrator.cli import main

    cfg = _config(tmp_path, {"w": {"pid": 10, "host": "host-a"}})
    assert main(["evacuate", "host-a", "--config", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1, err


def test_live_view_follows_bytes_and_rounds_between_phase_changes() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from orchestrator.progress import LiveView, listener

    ctx = SimpleNamespace(
        plan=SimpleNamespace(workload=SimpleNamespace(name="w"),
                             destination=SimpleNamespace(name="host-b")),
        bytes_transferred=0, rounds=[],
    )  # fmt: skip
    view = LiveView()
    listen = listener(ctx, view)  # type: ignore[arg-type]
    listen("precopy", None)
    ctx.bytes_transferred, ctx.rounds = 5 * 2**20, ["r1", "r2"]  # mid-phase: no event
    console = Console(record=True, width=120)
    console.print(view.render())
    row = next(ln for ln in console.export_text().splitlines() if ln.startswith("w "))
    assert "precopy" in row and " 2 " in row and "5.0 MiB" in row
