"""The runner with a recording fake host: phase and undo order, what is journaled, and that
every undo runs whatever another raised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import phases, runner, strategies
from orchestrator.errors import JournalError, MigrationError
from orchestrator.journal import Journal, Stage, read_events, summarize
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import ID, _FakeLock, criu, fail, pair, verbs, words

STOPCOPY = [
    "preflight",
    "prepare",
    "image-pipe",
    "dump",
    "transfer",
    "restore",
    "verify",
    "confirm",
]


def run(p, **kw):  # type: ignore[no-untyped-def]
    return runner.run(p.ctx, phases.build(p.ctx.strategy), p.journal, **kw)


def test_success_runs_phases_in_order_and_kills_source_last(tmp_path: Path) -> None:
    p = pair(tmp_path)
    report = run(p)
    assert report.status == "succeeded" and report.exit_code == 0
    assert [x.name for x in report.phases] == STOPCOPY
    order = verbs(p.log)
    # before the freeze: the source's ssh link to b (pre-flight's probe opens it), private
    # image dirs on both hosts
    assert order[:4] == ["a: mkdir /wa/images", "a: ssh master", f"a: mkdir /wa/images/{ID}",
                         f"b: mkdir /wb/images/{ID}"]  # fmt: skip
    assert not [argv for _, argv in p.log if argv[:1] == ["ssh"] and argv[-1:] == ["true"]]
    assert [o for o in order if "criu" in o or "rsync" in o or "kill" in o] == [
        "a: criu dump",
        f"a: rsync 198.18.0.2:/wb/images/{ID}/",
        "b: criu restore",
        "a: kill -KILL 100 101",
    ]
    assert order[-2:] == [f"a: rm -rf -- /wa/images/{ID}", f"b: rm -rf -- /wb/images/{ID}"]
    assert "a: ssh close" in order
    lock = "/wa/locks/pid-100.lock"
    assert ("a", ["lock", lock]) in p.log and p.log[-1] == ("a", ["unlock", lock])
    rsync = next(argv for _, argv in p.log if argv[:2] == ["rsync", "-a"])
    assert f"ControlPath=/wa/images/ssh-{ID}" in rsync[rsync.index("-e") + 1]
    assert report.restored_pid == 100 and report.downtime_ms is not None


def test_the_journal_names_each_phase_and_its_stage(tmp_path: Path) -> None:
    p = pair(tmp_path)
    run(p)
    s = summarize(p.journal.path)
    assert s is not None and s.status == "succeeded" and s.stage == Stage.CONFIRMING
    begun = [(e["name"], e["stage"]) for e in s.events if e.get("state") == "begin"]
    assert begun == [("preflight", 0), ("prepare", 1), ("image-pipe", 1), ("dump", 3),
                     ("transfer", 3),
                     ("restore", 4), ("verify", 4), ("confirm", 6)]  # fmt: skip
    assert s.root_pid == 100 and s.restored_pid == 100 and s.facts["command"] == "/bin/sh /w.sh"


def test_the_journal_never_goes_backwards(tmp_path: Path) -> None:
    j = Journal(tmp_path, ID)
    j.advance(Stage.FROZEN)
    j.advance(None)
    with pytest.raises(JournalError, match="RESTORING"):
        j.advance(Stage.RESTORING) or j.advance(Stage.PREPARED)


def test_restore_failure_rolls_back_newest_first(tmp_path: Path) -> None:
    p = pair(tmp_path)
    fail(p.dst, criu("restore"))
    report = run(p)
    assert report.status == "rolled_back" and report.exit_code == 3
    assert "criu restore failed on b" in (report.error or "")
    assert report.criu_errors == ["Error (criu/x.c:1): it broke"]
    assert [x.name for x in report.phases][-4:] == [
        "undo restore", "undo dump", "undo image-pipe", "undo prepare"
    ]  # fmt: skip
    order = verbs(p.log)
    after = order[order.index("b: criu restore") + 1 :]
    # the destination copy is removed before the source resumes; the source is never killed
    assert after[0] == "b: kill -KILL 100 101"
    assert after.index("a: kill -CONT 100 101") < after.index(f"b: rm -rf -- /wb/images/{ID}")
    assert "a: kill -KILL 100 101" not in order and "a: ssh close" in after
    events = summarize(p.journal.path).events  # type: ignore[union-attr]
    assert [e["event"] for e in events].count("undo") == 4


def test_preflight_refusal_changes_nothing(tmp_path: Path) -> None:
    p = pair(tmp_path)
    p.src.lacking.add("criu check")
    report = run(p)
    assert report.status == "failed" and report.exit_code == 1
    assert "criu check` failed" in (report.error or "")
    assert verbs(p.log) == []


def test_a_destination_workdir_with_no_room_at_all_says_so(tmp_path: Path) -> None:
    """df of a workdir that cannot be made (its nearest parent is /proc) says 0 free: the
    refusal asks whether the workdir can be made there, and nothing was changed."""
    p = pair(tmp_path)
    p.dst.lacking.add("df")
    report = run(p)
    assert report.status == "failed" and report.exit_code == 1
    assert (report.error or "").startswith("not enough space on b in /wb: 0 MiB free")
    assert (report.error or "").endswith("(none at all: can the workdir be made there?)")
    assert verbs(p.log) == []


def test_a_source_workdir_with_no_room_refuses_before_anything(tmp_path: Path) -> None:
    """The source writes images too (all of them with stop-copy): no room there is refused in
    pre-flight, naming the source; nothing was changed."""
    p = pair(tmp_path)
    p.src.lacking.add("df")
    report = run(p)
    assert report.status == "failed" and report.exit_code == 1
    assert (report.error or "").startswith("not enough space on a in /wa: 0 MiB free")
    assert verbs(p.log) == []


def test_unreachable_destination_fails_preflight_and_leaves_no_link(tmp_path: Path) -> None:
    """The probe is the opening of the link's master: when the source cannot reach the
    destination, pre-flight fails, nothing of prepare ran, and the master's log is removed."""
    p = pair(tmp_path)
    p.src.on(lambda argv: "ControlMaster=yes" in argv, err="ssh: connect: No route to host",
             code=1)  # fmt: skip
    report = run(p)
    assert report.status == "failed" and report.exit_code == 1
    assert report.error == "a cannot open its ssh link to b: ssh: connect: No route to host"
    assert [x.name for x in report.phases] == ["preflight"]
    assert verbs(p.log) == ["a: mkdir /wa/images", "a: ssh master"]
    assert p.log[-2:] == [("a", ["rm", "-f", "--", f"/wa/images/ssh-{ID}.log"]),
                          ("a", ["unlock", "/wa/locks/pid-100.lock"])]  # fmt: skip


@pytest.mark.parametrize("where", ["criu dump", "rsync"])
def test_failure_before_restore_resumes_source(tmp_path: Path, where: str) -> None:
    p = pair(tmp_path)
    fail(p.src, criu("dump") if where == "criu dump" else words("rsync", "-a"))
    report = run(p)
    assert report.status == "rolled_back"
    order = verbs(p.log)
    assert "a: kill -CONT 100 101" in order and "a: kill -KILL 100 101" not in order
    assert "b: criu restore" not in order


def test_dry_run_records_and_changes_nothing(tmp_path: Path) -> None:
    p = pair(tmp_path, dry_run=True)
    report = run(p)
    assert report.status == "succeeded"
    assert verbs(p.log) == []
    assert any(c.startswith("a$ criu dump") for c in p.src.planned)
    probe = [argv for h, argv in p.log if argv[:1] == ["ssh"] and argv[-1:] == ["true"]]
    assert len(probe) == 1 and "ControlMaster=yes" not in probe[0]  # read-only: no master


def test_a_bug_in_a_phase_still_rolls_back(tmp_path: Path) -> None:
    p = pair(tmp_path)

    def boom(argv: list[str]) -> Result | None:
        if argv[:2] == ["rsync", "-a"]:
            raise ValueError("a bug")
        return None

    p.src.answer(boom)
    report = run(p)
    assert report.status == "rolled_back" and report.error == "a bug"
    assert "a: kill -CONT 100 101" in verbs(p.log)


def test_a_bug_in_an_undo_skips_no_other_undo(tmp_path: Path) -> None:
    """A KeyError in one undo: the undos after it still run, the source is resumed, and the
    journal ends."""
    p = pair(tmp_path)
    fail(p.dst, criu("restore"))
    calls: list[str] = []

    def broken_restore_undo(argv: list[str]) -> Result | None:
        if argv[:2] == ["kill", "-KILL"] and not calls:
            calls.append("raised")
            raise KeyError("a bug in undo restore")
        return None

    p.dst.answer(broken_restore_undo)
    report = run(p)
    undo = {x.name: x.status for x in report.phases if x.name.startswith("undo ")}
    assert undo == {"undo restore": "undo_failed", "undo dump": "undone",
                    "undo image-pipe": "undone", "undo prepare": "undone"}  # fmt: skip
    assert "a: kill -CONT 100 101" in verbs(p.log) and report.status == "rolled_back"
    assert summarize(p.journal.path).status == "rolled_back"  # type: ignore[union-attr]


def test_workload_that_exited_is_named(tmp_path: Path) -> None:
    p = pair(tmp_path)
    fail(p.src, criu("dump"))

    def gone(argv: list[str]) -> Result | None:
        dumped = any(a[:1] == ["criu"] and a[1:2] == ["dump"] for _, a in p.log)
        return Result("a", argv, 1, "") if words("ps", "-o", "stat=")(argv) and dumped else None

    p.src.answer(gone)
    report = run(p)
    assert report.status == "failed" and report.exit_code == 1
    assert "exited by itself on a during dump" in (report.error or "")
    assert any("first error: criu dump failed" in n for n in report.notes)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only dir anyway")
def test_an_unwritable_journal_is_a_one_line_failure(tmp_path: Path) -> None:
    p = pair(tmp_path)
    tmp_path.chmod(0o500)
    try:
        report = run(p)
    finally:
        tmp_path.chmod(0o700)
    assert report.status == "failed" and "cannot write the journal" in (report.error or "")
    assert verbs(p.log) == []


def test_a_journal_that_fails_mid_run_rolls_back(tmp_path: Path) -> None:
    """A full or read-only state dir at the dump: rolled back with one line, never a
    traceback, and the source resumed."""
    p = pair(tmp_path)
    real = p.journal.write

    def write(event: str, **fields: object) -> None:
        if event == "phase" and fields.get("name") == "dump" and fields.get("state") == "done":
            raise JournalError(f"cannot write the journal {p.journal.path}: No space left")
        real(event, **fields)

    p.journal.write = write  # type: ignore[method-assign]
    report = run(p)
    assert report.status == "rolled_back" and "No space left" in (report.error or "")
    assert "a: kill -CONT 100 101" in verbs(p.log)


class Resumes(Phase):
    """Stands for LazyRestore: the destination runs from here."""

    name = "lazy-restore"

    def act(self, ctx: Context) -> None:
        pass

    def undo(self, ctx: Context) -> None:
        raise AssertionError("never undone")


class Breaks(Phase):
    name = "pull-pages"

    def act(self, ctx: Context) -> None:
        raise MigrationError("POST-COPY INCOMPLETE: the link broke")


class Never(Phase):
    name = "confirm"

    def act(self, ctx: Context) -> None:
        raise AssertionError("no confirm after a broken post-copy")


def test_failure_after_the_point_of_no_return_is_stranded(tmp_path: Path) -> None:
    p = pair(tmp_path, strategy="postcopy")
    report = runner.run(p.ctx, [Resumes(), Breaks(), Never()], p.journal)
    assert report.status == "stranded" and report.exit_code == 4
    assert "POST-COPY INCOMPLETE" in (report.error or "")
    assert any(n.startswith("NO ROLLBACK") for n in report.notes)
    assert [x.name for x in report.phases] == ["lazy-restore", "pull-pages"]
    assert summarize(p.journal.path).committed  # type: ignore[union-attr]


def test_a_state_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    p = pair(tmp_path)
    tmp_path.chmod(0o777)
    try:
        report = run(p)
    finally:
        tmp_path.chmod(0o700)
    assert report.status == "failed" and "must be yours and not group/world-writable" in (
        report.error or ""
    )
    assert verbs(p.log) == []


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ("100 1 Zs 0 [w] <defunct>\n", "is a zombie"),
        ("100 1 Ss 2048 /bin/sh /w.sh\n101 100 S 1024 sshd: root@notty\n", "an ssh session"),
    ],
)
def test_what_is_no_workload_is_bad_input(tmp_path: Path, table: str, why: str) -> None:
    """Refused in pre-flight with exit 2, before any lock or freeze."""
    p = pair(tmp_path)
    p.src.on(words("ps", "-ww", "-e"), table)
    report = run(p)
    assert report.status == "failed" and report.exit_code == 2 and why in (report.error or "")
    assert verbs(p.log) == [] and not any(argv[0] == "lock" for _, argv in p.log)


def test_rollback_leaves_tasks_the_workload_had_stopped(tmp_path: Path) -> None:
    """A task the workload stopped itself (T before the freeze) stays stopped after a
    rollback: the tool resumes only what it stopped."""
    p = pair(tmp_path)
    p.src.on(words("ps", "-ww", "-e"), "100 1 Ss 2048 /bin/sh /w.sh\n101 100 T 1024 sleep 1\n")
    fail(p.src, criu("dump"))
    report = run(p)
    assert report.status == "rolled_back"
    assert "a: kill -CONT 100" in verbs(p.log) and "a: kill -CONT 100 101" not in verbs(p.log)


def test_every_strategy_only_goes_forward() -> None:
    """The journal refuses a stage going backwards: no strategy's phase list may ask it."""
    for strategy in strategies.TABLE.values():
        stages = [p.stage for p in phases.build(strategy) if p.stage is not None]
        assert stages == sorted(stages), strategy.name


def test_a_lock_lost_before_confirm_never_undoes_the_verified_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source host is gone after verify (its lock cannot be taken again): nothing is undone
    (the destination's copy may be the only one left), the journal stays open for recover."""
    p = pair(tmp_path)

    def ensure(_lock: object) -> bool:
        done = [e.get("name") for e in read_events(p.journal.path) if e.get("state") == "done"]
        if "verify" in done:
            raise MigrationError("a (198.18.0.1): cannot connect")
        return False

    monkeypatch.setattr(_FakeLock, "ensure", ensure)
    report = run(p)
    assert report.status == "failed" and report.exit_code == 1
    assert "cannot take it again before confirm" in (report.error or "")
    assert [x.name for x in report.phases][-2:] == ["verify", "confirm"]
    assert not [o for o in verbs(p.log) if "kill" in o or "rm -rf" in o], verbs(p.log)
    assert any(n.startswith("NOT CONFIRMED") and f"migrate recover {ID}" in n for n in report.notes)
    s = summarize(p.journal.path)
    assert s is not None and s.status is None  # open: recover decides


def test_history_tells_a_running_migration_from_one_whose_controller_died(
    tmp_path: Path,
) -> None:
    """An unfinished journal is `running` while a live process holds its flock (read from
    /proc/locks, without taking the lock), and no longer once it lets go; a second run of the
    workload is told to wait, not to recover."""
    j = Journal(tmp_path, ID)
    j.write("start", id=ID, workload="w", source="a", destination="b", strategy="stopcopy")
    j.write("phase", name="verify", state="begin")
    j.hold()
    try:
        running = summarize(j.path)
        assert running is not None and running.status is None and running.running
        j2 = Journal(tmp_path, ID)  # a recover now: refused, the controller lives
        with pytest.raises(JournalError, match="is live"):
            j2.hold()
        assert summarize(j.path).running  # type: ignore[union-attr]  # asking took nothing
    finally:
        j.release()
    dead = summarize(j.path)
    assert dead is not None and dead.status is None and not dead.running
