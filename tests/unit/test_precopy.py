"""Pre-copy with a recording fake host: the rounds' commands, the stop rule's reason, the
final dump on top of the last round, rollback, and the pre-flight refusal."""

from __future__ import annotations

import base64
import dataclasses
import struct
import time
from pathlib import Path

import pytest

from orchestrator import phases, render, runner, session, strategies
from orchestrator.checkpoint import Capability
from orchestrator.config import Policy, WorkloadConfig
from orchestrator.criu import commands as criu
from orchestrator.criu import images
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import ID, FakeHost, Pair, has, inner, pair, verbs
from tests.unit.fakehost import criu as criu_cmd

IMG = f"/wa/images/{ID}"

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
        if fail and criu_cmd("pre-dump")(argv) and has(fail)(argv):
            return Result(host.name, argv, 1, "", "Error (criu/mem.c:1): it broke")
        if argv[:4] == ["criu", "check", "--feature", "mem_dirty_track"]:
            return Result(host.name, argv, 0 if dirty_tracking else 1)
        if argv[0] == "base64":
            sub = argv[-1].split("/")[-2]
            return Result(host.name, argv, 0, base64.b64encode(stats_image(PAGES[sub])).decode())
        if criu_cmd("pre-dump")(argv):
            time.sleep(0.01)  # a fixed cost the stop rule can see (vs max_downtime_ms=1)
        if argv[:2] == ["rsync", "-a"]:
            return Result(host.name, argv, 0, "Total bytes sent: 4,096\n")
        return None

    host.answer(respond)
    if not dirty_tracking:  # (pre-flight's facts)
        host.lacking.add("mem_dirty_track")


def make_precopy(tmp_path: Path, max_iterations: int = 6, **kw: object) -> Pair:
    policy = Policy(retries=2, retry_deadline=5, max_downtime_ms=1, goal=20,
                    max_iterations=max_iterations)  # fmt: skip
    wl = WorkloadConfig("w", pid=100, sync_paths=("/srv/state",))
    p = pair(tmp_path, "precopy", policy=policy, workload=wl)
    precopy_host(p.src, **kw)  # type: ignore[arg-type]
    return p


def run(p: Pair):  # type: ignore[no-untyped-def]
    return runner.run(p.ctx, phases.build(p.ctx.strategy), p.journal)


def lines(p: Pair, host: str = "a") -> list[str]:
    return [" ".join(inner(argv)) for h, argv in p.log if h == host]


def test_rounds_then_final_dump_on_top_of_the_last(tmp_path: Path) -> None:
    p = make_precopy(tmp_path)
    report = run(p)
    assert report.status == "succeeded", report.error
    assert [p.name for p in report.phases] == [
        "preflight", "prepare", "rounds", "image-pipe", "dump", "transfer", "restore", "verify",
        "final-round", "confirm",
    ]  # fmt: skip
    cmds = [c for c in lines(p) if c.startswith(("criu pre-dump", "criu dump"))]
    assert [c.split(" -o ")[0] for c in cmds] == [
        f"criu pre-dump -t 100 -D {IMG}/1",
        f"criu pre-dump -t 100 -D {IMG}/2",
        f"criu pre-dump -t 100 -D {IMG}/3",
        f"criu dump -t 100 -D {IMG}/final",
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
    rsyncs = [argv for _, argv in p.log if argv[:2] == ["rsync", "-a"]]
    pushes = [argv[-2:] for argv in rsyncs if "--relative" not in argv]
    assert pushes == [[f"{IMG}/{d}/", f"198.18.0.2:/wb/images/{ID}/{d}/"]
                      for d in ("1", "2", "3", "final")]  # fmt: skip
    # sync_paths go along with every round, and once more while frozen.
    syncs = [argv for argv in rsyncs if "--relative" in argv]
    assert len(syncs) == 4 and all(a[-2:] == ["/srv/state", "198.18.0.2:/"] for a in syncs)
    restore = next(argv for h, argv in p.log if criu_cmd("restore")(argv))
    final = f"/wb/images/{ID}/final"
    assert final in restore and f"{final}/restored.pid" in restore
    # The report: three rounds and the final dump, and why it stopped.
    assert report.stopped_by == "goal"
    assert [(r.kind, r.pages_written) for r in report.rounds] == [
        ("pre-dump", 65536), ("pre-dump", 20000), ("pre-dump", 3000), ("dump", 2500),
    ]  # fmt: skip
    assert report.rounds[0].dirty_rate is None and report.rounds[1].dirty_rate
    assert report.rounds[0].bytes_sent == 2 * 4096 and report.rounds[0].frozen_ms == 1.234
    assert report.to_dict()["rounds"][3]["kind"] == "dump"
    assert verbs(p.log)[-2:] == [f"a: rm -rf -- {IMG}", f"b: rm -rf -- /wb/images/{ID}"]


def test_max_iterations_stops_it(tmp_path: Path) -> None:
    report = run(make_precopy(tmp_path, max_iterations=2))
    assert report.status == "succeeded" and report.stopped_by == "max-iterations"
    assert [r.number for r in report.rounds] == [1, 2, 3]
    assert any("2 round(s), stopped by max-iterations" in n for n in report.notes)


def test_failed_round_rolls_back_and_wipes_rounds(tmp_path: Path) -> None:
    p = make_precopy(tmp_path, fail=f"{IMG}/2")
    report = run(p)
    assert report.status == "rolled_back", report.error
    assert "criu pre-dump failed on a" in (report.error or "")
    order = verbs(p.log)
    assert f"a: rm -rf -- {IMG}/1" in order and f"b: rm -rf -- /wb/images/{ID}/1" in order
    assert not any("criu dump" in o or "kill" in o for o in order)  # never stopped or killed


def test_refused_in_preflight_without_dirty_tracking(tmp_path: Path) -> None:
    p = make_precopy(tmp_path, dirty_tracking=False)
    report = run(p)
    assert report.status == "failed" and [p.name for p in report.phases] == ["preflight"]
    assert report.error == (
        "pre-copy needs CRIU feature mem_dirty_track on a, which its kernel or CRIU lacks "
        "(`criu check --feature`)"
    )
    assert verbs(p.log) == [] and not any(argv[0] == "lock" for _, argv in p.log)


@pytest.mark.parametrize(
    ("src", "can", "expected"),
    [
        (["mem_dirty_track"], frozenset(Capability), "precopy"),
        ([], frozenset(Capability), "stopcopy"),  # no soft-dirty on the source
        (["mem_dirty_track"], frozenset(), "stopcopy"),  # runtime cannot
    ],
)
def test_auto_picks_precopy_where_the_source_tracks_dirty_memory(
    src: list[str], can: frozenset[Capability], expected: str
) -> None:
    name, why = strategies.choose(Policy(), src, [], can)
    assert name == expected and why.startswith(f"auto: {expected[:3]}")
    if expected == "stopcopy":
        assert "pre-copy" in why


def test_dirty_tracking_probe(tmp_path: Path) -> None:
    p = make_precopy(tmp_path)
    runtime = p.ctx.runtime
    name, _ = session.settle_auto(Policy(), p.src, p.dst, runtime)
    assert name == "precopy"
    p = make_precopy(tmp_path, dirty_tracking=False)
    assert session.settle_auto(Policy(), p.src, p.dst, runtime)[0] == "stopcopy"


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
    from orchestrator.report import Report, Round

    r = Report("ID", "w", "a", "b", "precopy", status="succeeded", downtime_ms=1200)
    r.rounds = [
        Round(1, "pre-dump", 65536, 0, 3 << 20, 12.5, 10.0, 2.5, None, 400.0),
        Round(2, "pre-dump", 6000, 59536, 1 << 20, 2.0, 1.5, 0.5, 480.0, 90.0),
        Round(3, "dump", 900, 64636, 1 << 19, 1.0, 0.6, 0.4, 450.0, 600.0),
    ]
    r.stopped_by = "goal"
    render.report(r)
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    lines = out.splitlines()
    assert lines[0].split() == ["round", "kind", "pages", "skipped", "MiB", "sent", "seconds",
                                "dirty", "pages/s", "frozen", "ms"]  # fmt: skip
    assert lines[1].split() == ["1", "pre-dump", "65536", "0", "3.0", "12.50", "-", "400"]
    assert lines[3].split() == ["3", "dump", "900", "64636", "0.5", "1.00", "450", "600"]
    assert "pre-copy stopped by: goal" in out and "downtime 1200 ms" in out
    assert r.to_dict()["rounds"][1]["dirty_rate"] == 480.0


def test_dry_run_plans_one_round_and_the_final_dump(tmp_path: Path) -> None:
    p = pair(tmp_path, "precopy", dry_run=True)
    precopy_host(p.src)
    report = run(p)
    assert report.status == "succeeded" and report.rounds == [] and report.stopped_by == "dry-run"
    planned = [c.split(" -o ")[0] for c in report.planned_commands if "criu" in c]
    assert planned[:2] == [f"a$ criu pre-dump -t 100 -D {IMG}/1",
                           f"a$ criu dump -t 100 -D {IMG}/final"]  # fmt: skip
    assert "--prev-images-dir ../1" in next(c for c in report.planned_commands if "criu dump" in c)
