"""Pre-copy with a recording fake host: the rounds' commands, the stop rule's reason, the
final dump on top of the last round, rollback, and the pre-flight refusal."""

from __future__ import annotations

import base64
import dataclasses
import struct
import time
from pathlib import Path

import pytest

from orchestrator import runner, strategies
from orchestrator.config import Policy, WorkloadConfig
from orchestrator.criu import commands as criu
from orchestrator.criu import images
from orchestrator.phases import precopy
from orchestrator.plan import Context
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import FakeHost
from tests.unit.test_runner import make, mutating

PAGES = {"1": 65536, "2": 20000, "3": 3000, "final": 2500}  # round 3 wrote 15% of round 2's


def stats_image(pages: int) -> bytes:
    def var(v: int) -> bytes:
        out = b""
        while v > 0x7F:
            out, v = out + bytes([v & 0x7F | 0x80]), v >> 7
        return out + bytes([v])

    dump = bytes([7 << 3]) + var(pages) + bytes([2 << 3]) + var(1234)
    entry = bytes([1 << 3 | 2]) + var(len(dump)) + dump
    return struct.pack("<III", images.IMG_SERVICE_MAGIC, images.STATS_MAGIC, len(entry)) + entry


def precopy_host(host: FakeHost, dirty_tracking: bool = True, fail: str | None = None) -> None:
    def respond(argv: list[str]) -> Result | None:
        line = " ".join(argv)
        if fail and fail in line:
            return Result(host.name, argv, 1, "", "Error (criu/mem.c:1): it broke")
        if "--feature mem_dirty_track" in line:
            return Result(host.name, argv, 0 if dirty_tracking else 1)
        if argv[0] == "sh" and "check --feature" in argv[2]:  # pre-flight's feature probe
            has = [f for f in argv[5:] if f != "mem_dirty_track" or dirty_tracking]
            return Result(host.name, argv, 0, "\n".join(has) + "\n")
        if argv[0] == "base64":
            sub = argv[-1].split("/")[-2]
            return Result(host.name, argv, 0, base64.b64encode(stats_image(PAGES[sub])).decode())
        if "criu pre-dump" in line:
            time.sleep(0.01)  # a fixed cost the stop rule can see (vs max_downtime_ms=1)
        if argv[0] == "rsync":
            return Result(host.name, argv, 0, "Total bytes sent: 4,096\n")
        return None

    host.responders.insert(0, respond)


def make_precopy(tmp_path: Path, **kw: object) -> tuple[Context, object, list[tuple[str, str]]]:
    ctx, journal, log = make(tmp_path)
    policy = Policy(retries=2, retry_deadline=5, max_downtime_ms=1, goal=20, max_iterations=6)
    wl = WorkloadConfig("w", pid=100, sync_paths=("/srv/state",))
    ctx.plan = dataclasses.replace(ctx.plan, strategy="precopy", policy=policy, workload=wl)
    ctx.runtime.workload = wl
    precopy_host(ctx.src, **kw)  # type: ignore[arg-type]
    return ctx, journal, log


def test_rounds_then_final_dump_on_top_of_the_last(tmp_path: Path) -> None:
    ctx, journal, log = make_precopy(tmp_path)
    report = runner.run(ctx, strategies.phases("precopy"), journal)  # type: ignore[arg-type]
    assert report.status == "succeeded", report.error
    assert [p.name for p in report.phases] == [
        "preflight", "prepare", "precopy", "dump", "transfer", "restore", "verify",
        "final-round", "confirm",
    ]  # fmt: skip
    cmds = [c for h, c in log if h == "a" and c.startswith(("criu pre-dump", "criu dump"))]
    assert [c.split(" -o ")[0] for c in cmds] == [
        "criu pre-dump -t 100 -D /wa/images/ID/1",
        "criu pre-dump -t 100 -D /wa/images/ID/2",
        "criu pre-dump -t 100 -D /wa/images/ID/3",
        "criu dump -t 100 -D /wa/images/ID/final",
    ]
    assert all("--track-mem" in c for c in cmds)
    assert "--prev-images-dir" not in cmds[0]
    assert [c.split("--prev-images-dir ")[1].split()[0] for c in cmds[1:]] == [
        "../1",
        "../2",
        "../3",
    ]
    assert "--leave-stopped" in cmds[3] and "--leave-stopped" not in cmds[2]
    # Each round's dir is rsynced as it is made; then the final dir, under the freeze.
    pushes = [c.split()[-2:] for h, c in log if c.startswith("rsync -a") and "--relative" not in c]
    assert pushes == [[f"/wa/images/ID/{d}/", f"198.18.0.2:/wb/images/ID/{d}/"]
                      for d in ("1", "2", "3", "final")]  # fmt: skip
    # sync_paths go along with every round, and once more while frozen.
    syncs = [c for h, c in log if c.startswith("rsync") and "--relative" in c]
    assert len(syncs) == 4 and all(c.endswith("/srv/state 198.18.0.2:/") for c in syncs)
    restore = next(c for h, c in log if "criu restore" in c)
    assert " -D /wb/images/ID/final " in restore and "/wb/images/ID/final/restored.pid" in restore
    # The report: three rounds and the final dump, and why it stopped.
    assert report.stopped_by == "goal"
    assert [(r.kind, r.pages_written) for r in report.rounds] == [
        ("pre-dump", 65536), ("pre-dump", 20000), ("pre-dump", 3000), ("dump", 2500),
    ]  # fmt: skip
    assert report.rounds[0].dirty_rate is None and report.rounds[1].dirty_rate
    assert report.rounds[0].bytes_sent == 2 * 4096 and report.rounds[0].frozen_ms == 1.234
    assert report.to_dict()["rounds"][3]["kind"] == "dump"
    assert mutating(log)[-2:] == ["a: rm -rf -- /wa/images/ID", "b: rm -rf -- /wb/images/ID"]


def test_max_iterations_stops_it(tmp_path: Path) -> None:
    ctx, journal, _ = make_precopy(tmp_path)
    ctx.plan = dataclasses.replace(
        ctx.plan, policy=dataclasses.replace(ctx.plan.policy, max_iterations=2)
    )
    report = runner.run(ctx, strategies.phases("precopy"), journal)  # type: ignore[arg-type]
    assert report.status == "succeeded" and report.stopped_by == "max-iterations"
    assert [r.number for r in report.rounds] == [1, 2, 3]
    assert any("2 round(s), stopped by max-iterations" in n for n in report.notes)


def test_failed_round_rolls_back_and_wipes_rounds(tmp_path: Path) -> None:
    ctx, journal, log = make_precopy(tmp_path, fail="-D /wa/images/ID/2")
    report = runner.run(ctx, strategies.phases("precopy"), journal)  # type: ignore[arg-type]
    assert report.status == "rolled_back", report.error
    assert "criu pre-dump failed on a" in (report.error or "")
    order = mutating(log)
    assert "a: rm -rf -- /wa/images/ID/1" in order and "b: rm -rf -- /wb/images/ID/1" in order
    assert not any("criu dump" in o or "kill" in o for o in order)  # never stopped or killed


def test_refused_in_preflight_without_dirty_tracking(tmp_path: Path) -> None:
    ctx, journal, log = make_precopy(tmp_path, dirty_tracking=False)
    report = runner.run(ctx, strategies.phases("precopy"), journal)  # type: ignore[arg-type]
    assert report.status == "failed" and [p.name for p in report.phases] == ["preflight"]
    assert report.error == (
        "pre-copy needs CRIU feature mem_dirty_track on a, which its kernel or CRIU lacks "
        "(`criu check --feature`)"
    )
    assert mutating(log) == [] and not any(c.startswith("lock ") for _, c in log)


@pytest.mark.parametrize(
    ("src", "can", "expected"),
    [
        (["mem_dirty_track"], frozenset(strategies.STRATEGIES), "precopy"),
        ([], frozenset(strategies.STRATEGIES), "stopcopy"),  # no soft-dirty on the source
        (["mem_dirty_track"], frozenset({"stopcopy"}), "stopcopy"),  # runtime cannot
    ],
)
def test_auto_picks_precopy_where_the_source_tracks_dirty_memory(
    src: list[str], can: frozenset[str], expected: str
) -> None:
    name, why = strategies.choose(Policy(), src, [], can)
    assert name == expected and why.startswith(f"auto: {expected[:3]}")
    if expected == "stopcopy":
        assert "pre-copy" in why


def test_dirty_tracking_probe(tmp_path: Path) -> None:
    ctx, _, _ = make_precopy(tmp_path)
    assert precopy.dirty_tracking(ctx.src)  # type: ignore[arg-type]
    ctx, _, _ = make_precopy(tmp_path, dirty_tracking=False)
    assert not precopy.dirty_tracking(ctx.src)  # type: ignore[arg-type]


def test_pre_dump_and_final_dump_argv() -> None:
    o = criu.DumpOptions(pid=7, images_dir="/i/2", track_mem=True, prev_images_dir="../1")
    assert criu.pre_dump("criu", o) == [
        "criu", "pre-dump", "-t", "7", "-D", "/i/2", "-o", "pre-dump.log", "-v4",
        "--track-mem", "--prev-images-dir", "../1",
    ]  # fmt: skip
    d = criu.dump("criu", dataclasses.replace(o, images_dir="/i/final", prev_images_dir="../2"))
    assert d[-3:] == ["--track-mem", "--prev-images-dir", "../2"] and "--leave-stopped" in d
    assert "--track-mem" not in criu.dump("criu", criu.DumpOptions(pid=7, images_dir="/i"))


def test_rounds_table_and_json(capsys: object) -> None:
    from orchestrator import cli
    from orchestrator.report import Report, Round

    r = Report("ID", "w", "a", "b", "precopy", status="succeeded", downtime_ms=1200)
    r.rounds = [
        Round(1, "pre-dump", 65536, 0, 3 << 20, 12.5, 10.0, 2.5, None, 400.0),
        Round(2, "pre-dump", 6000, 59536, 1 << 20, 2.0, 1.5, 0.5, 480.0, 90.0),
        Round(3, "dump", 900, 64636, 1 << 19, 1.0, 0.6, 0.4, 450.0, 600.0),
    ]
    r.stopped_by = "goal"
    cli._print_report(r)
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    lines = out.splitlines()
    assert lines[0].split() == ["round", "kind", "pages", "skipped", "MiB", "sent", "seconds",
                                "dirty", "pages/s", "frozen", "ms"]  # fmt: skip
    assert lines[1].split() == ["1", "pre-dump", "65536", "0", "3.0", "12.50", "-", "400"]
    assert lines[3].split() == ["3", "dump", "900", "64636", "0.5", "1.00", "450", "600"]
    assert "pre-copy stopped by: goal" in out and "downtime 1200 ms" in out
    assert r.to_dict()["rounds"][1]["dirty_rate"] == 480.0


def test_dry_run_plans_one_round_and_the_final_dump(tmp_path: Path) -> None:
    ctx, journal, _ = make(tmp_path, dry_run=True)
    ctx.plan = dataclasses.replace(ctx.plan, strategy="precopy")
    precopy_host(ctx.src)  # type: ignore[arg-type]
    report = runner.run(ctx, strategies.phases("precopy"), journal)  # type: ignore[arg-type]
    assert report.status == "succeeded" and report.rounds == [] and report.stopped_by == "dry-run"
    planned = [c.split(" -o ")[0] for c in report.planned_commands if "criu" in c]
    assert planned[:2] == ["a$ criu pre-dump -t 100 -D /wa/images/ID/1",
                           "a$ criu dump -t 100 -D /wa/images/ID/final"]  # fmt: skip
    assert "--prev-images-dir ../1" in next(c for c in report.planned_commands if "criu dump" in c)
