"""A workload holding file locks, with a recording fake host: the source copy ends right after
its dump (before the restore takes the locks), both CRIU commands carry --file-locks, and a
failed restore rolls back by restoring the source from its images. (The lab proves CRIU.)"""

from __future__ import annotations

from pathlib import Path

from orchestrator import phases, runner, workloadcheck
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import TREE, FakeHost, criu, fail, inner, pair, script, verbs, words

LOCKED = TREE.replace(
    "fd 0 /dev/null\nmnt 24\n",
    "fd 0 /dev/null\nmnt 24\nfd 3 /shared/db.lock\nmnt 30\n"
    "lock 1: POSIX  ADVISORY  WRITE 100 fe:00:1234 0 EOF\n",
)


def lock_holder(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = pair(tmp_path)
    p.src.on(script(workloadcheck._SCRIPT), LOCKED)
    gone = _exits_when_killed(p.src)
    return p, gone


def _exits_when_killed(host: FakeHost) -> list[bool]:
    """pid 100 is gone once killed on host, and back once a restore ran there."""
    gone: list[bool] = []

    def watch(argv: list[str]) -> None:
        if argv[:1] == ["kill"]:
            gone.append(True)
        if criu("restore")(argv):
            gone.clear()

    host.watchers.append(watch)
    host.answer(lambda a: Result(host.name, a, 0, "") if gone and words("ps")(a) else None)
    return gone


def run(p):  # type: ignore[no-untyped-def]
    return runner.run(p.ctx, phases.build(p.ctx.strategy), p.journal)


def test_the_source_ends_at_its_dump_before_the_restore(tmp_path: Path) -> None:
    p, _ = lock_holder(tmp_path)
    report = run(p)
    assert report.status == "succeeded", report.error
    order = [o for o in verbs(p.log) if "criu" in o or "kill" in o]
    assert order == ["a: criu dump", "a: kill -KILL 100 101", "b: criu restore"]
    dump = next(inner(a) for h, a in p.log if inner(a)[:2] == ["criu", "dump"])
    restore = next(inner(a) for h, a in p.log if inner(a)[:2] == ["criu", "restore"])
    assert "--file-locks" in dump and "--file-locks" in restore
    assert p.ctx.target is not None and p.ctx.target.locked_files == ["/shared/db.lock"]


def test_a_failed_restore_brings_the_source_back_from_its_images(tmp_path: Path) -> None:
    p, gone = lock_holder(tmp_path)
    fail(p.dst, criu("restore"))
    report = run(p)
    assert report.status == "rolled_back", report.error
    order = [o for o in verbs(p.log) if "criu" in o or "kill" in o]
    assert order == ["a: criu dump", "a: kill -KILL 100 101", "b: criu restore",
                     "b: kill -KILL 100 101", "a: criu restore"]  # fmt: skip
    restores = [inner(a) for h, a in p.log if h == "a" and inner(a)[:2] == ["criu", "restore"]]
    assert "--file-locks" in restores[0]
    assert not gone  # it runs on the source again


def test_without_locks_the_source_stays_stopped_until_confirm(tmp_path: Path) -> None:
    p = pair(tmp_path)
    run(p)
    order = [o for o in verbs(p.log) if "criu" in o or "kill" in o]
    assert order == ["a: criu dump", "b: criu restore", "a: kill -KILL 100 101"]
    dump = next(inner(a) for h, a in p.log if inner(a)[:2] == ["criu", "dump"])
    assert "--file-locks" not in dump
