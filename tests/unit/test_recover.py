"""The recovery rule over every combination of journal state and host facts, and recover
itself against fake hosts after a controller died at each phase."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from orchestrator import phases, runner
from orchestrator.config import Config
from orchestrator.errors import MigrationError
from orchestrator.journal import Stage, summarize
from orchestrator.phases.base import Phase
from orchestrator.recover import (
    GONE,
    RUNNING,
    STOPPED,
    UNREACHABLE,
    Action,
    PageState,
    Seen,
    decide,
    recover,
)  # fmt: skip
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import ID, FakeHost, Pair, criu, fail, pair, verbs, words

STATES = (RUNNING, STOPPED, GONE, UNREACHABLE)
ALL = list(itertools.product(
    Stage, (False, True), (False, True), STATES, STATES, (False, True), (None, True, False),
    PageState,
))  # fmt: skip


def _d(stage, lazy, committed, src, dst, images, healthy, pages):  # type: ignore[no-untyped-def]
    return decide(stage, lazy, committed, Seen(src, dst, images, healthy, pages))


def test_the_rule_never_leaves_zero_or_two_copies() -> None:
    """Every (stage, strategy kind, committed, source, destination, images, health, pages)."""
    assert len(ALL) == 7 * 2 * 2 * 4 * 4 * 2 * 3 * 4
    for case in ALL:
        check_case(case)


def check_case(case: tuple) -> None:  # type: ignore[type-arg]
    stage, lazy, committed, src, dst, images, healthy, pages = case
    d = _d(*case)
    dest_may_hold = stage >= Stage.RESTORING
    if stage == Stage.PLANNED:
        assert d.action is Action.NOTHING
        return
    if src == UNREACHABLE or (dst == UNREACHABLE and dest_may_hold):
        assert d.action is Action.WAIT  # never act on what cannot be seen
        return
    resumed = lazy and (committed or stage >= Stage.RESUMED or
                        (dest_may_hold and dst in (RUNNING, STOPPED)))  # fmt: skip
    if resumed:  # past post-copy's point of no return: never roll back
        assert d.action in (Action.CONFIRM, Action.STRANDED)
        assert (d.action is Action.CONFIRM) == (pages is PageState.ALL_THERE)
        return
    source_copy = src in (RUNNING, STOPPED) or images
    dest_runs = dest_may_hold and dst == RUNNING
    if d.action is Action.CONFIRM:
        assert dest_runs and src != RUNNING  # the destination keeps the one copy
        # unhealthy only if nothing else, or once confirm had begun (verified then)
        assert healthy is not False or not source_copy or stage >= Stage.CONFIRMING
    elif d.action in (Action.ROLLBACK, Action.ABORT_LAZY):
        assert source_copy  # something to resume: never the last copy removed
        assert (d.action is Action.ABORT_LAZY) == (lazy and stage >= Stage.FROZEN)
    else:
        assert d.action is Action.LOST and not source_copy and not dest_runs


@pytest.mark.parametrize(
    ("stage", "src", "dst", "expected"),
    [
        (Stage.PREPARED, RUNNING, GONE, Action.ROLLBACK),
        (Stage.FROZEN, STOPPED, GONE, Action.ROLLBACK),
        (Stage.FROZEN, STOPPED, RUNNING, Action.ROLLBACK),  # no restore had begun: not ours
        (Stage.RESTORING, STOPPED, RUNNING, Action.CONFIRM),
        (Stage.RESTORING, STOPPED, STOPPED, Action.ROLLBACK),
        (Stage.RESTORING, RUNNING, RUNNING, Action.ROLLBACK),  # two copies: the destination's goes
        (Stage.CONFIRMING, GONE, RUNNING, Action.CONFIRM),
        (Stage.CONFIRMING, GONE, GONE, Action.LOST),
        (Stage.RESTORING, GONE, UNREACHABLE, Action.WAIT),
        (Stage.FROZEN, STOPPED, UNREACHABLE, Action.ROLLBACK),  # b cannot hold a copy yet
    ],
)
def test_stop_copy_cases(stage: Stage, src: str, dst: str, expected: Action) -> None:
    assert decide(stage, False, False, Seen(src, dst)).action is expected


def test_post_copy_cases() -> None:
    assert decide(Stage.FROZEN, True, False, Seen(STOPPED, GONE)).action is Action.ABORT_LAZY
    assert decide(Stage.PREPARED, True, False, Seen(RUNNING, GONE)).action is Action.ROLLBACK
    done = Seen(STOPPED, RUNNING, pages=PageState.ALL_THERE)
    assert decide(Stage.RESUMED, True, True, done).action is Action.CONFIRM
    pulling = Seen(STOPPED, RUNNING, pages=PageState.STILL_PULLING)
    assert decide(Stage.RESUMED, True, True, pulling).action is Action.STRANDED
    # restored but the controller died before journaling it: judged by the pages too
    assert decide(Stage.RESTORING, True, False, pulling).action is Action.STRANDED


def test_unhealthy_destination_is_kept_only_without_a_source_copy() -> None:
    sick = Seen(STOPPED, RUNNING, healthy=False)
    assert decide(Stage.RESTORING, False, False, sick).action is Action.ROLLBACK
    alone = Seen(GONE, RUNNING, healthy=False)
    d = decide(Stage.RESTORING, False, False, alone)
    assert d.action is Action.CONFIRM and "unhealthy" in d.why


# --- recover against fake hosts -------------------------------------------------------------


class Dies(Exception):
    """Stands for the controller's death: nothing in the runner catches a BaseException."""


class _Death(BaseException):
    pass


def died_at(tmp_path: Path, phase: str, strategy: str = "stopcopy") -> Pair:
    """Run until `phase` begins, then let the controller die (its journal stays unfinished)."""
    p = pair(tmp_path, strategy)
    built = phases.build(p.ctx.strategy)

    class Killed(Phase):
        name = phase

        def act(self, ctx):  # type: ignore[no-untyped-def]
            raise _Death

    i = [x.name for x in built].index(phase)
    Killed.stage = built[i].stage
    with pytest.raises(_Death):
        runner.run(p.ctx, [*built[:i], Killed()], p.journal)
    p.journal.release()  # as the kernel does for a dead process
    return p


def stopped_until_cont(host: FakeHost) -> None:
    """The source shows `T` (left stopped by the dump) until a SIGCONT reaches it."""
    seen: list[bool] = []
    host.watchers.append(lambda argv: seen.append(True) if argv[:2] == ["kill", "-CONT"] else None)
    host.answer(lambda argv: Result(host.name, argv, 0, "S\n" if seen else "T\n")
                if words("ps", "-o", "stat=")(argv) else None)  # fmt: skip


def recovered(tmp_path: Path, p: Pair):  # type: ignore[no-untyped-def]
    s = summarize(p.journal.path)
    assert s is not None and s.status is None
    config = Config(tmp_path / "migrate.yaml", {"a": p.src.config, "b": p.dst.config},
                    state_dir=tmp_path)  # fmt: skip
    hosts = {"a": p.src, "b": p.dst}
    p.log.clear()
    return recover(config, s, connect=lambda cfg, _policy: hosts[cfg.name])


def test_recover_after_death_in_preflight_changes_nothing(tmp_path: Path) -> None:
    report = recovered(tmp_path, died_at(tmp_path, "preflight"))
    assert report.status == "rolled_back" and verbs(report and []) == []


@pytest.mark.parametrize("phase", ["prepare", "dump", "transfer"])
def test_recover_before_restore_rolls_back(tmp_path: Path, phase: str) -> None:
    p = died_at(tmp_path, phase)
    if phase != "prepare":  # the dump left the source stopped
        stopped_until_cont(p.src)
    report = recovered(tmp_path, p)
    assert report.status == "rolled_back", report.error
    order = verbs(p.log)
    if phase != "prepare":
        assert "a: kill -CONT 100 101" in order
    assert "a: kill -KILL 100 101" not in order
    assert order[-2:] == [f"a: rm -rf -- /wa/images/{ID}", f"b: rm -rf -- /wb/images/{ID}"]
    assert summarize(p.journal.path).status == "rolled_back"  # type: ignore[union-attr]


def test_recover_after_restore_confirms(tmp_path: Path) -> None:
    p = died_at(tmp_path, "verify")
    p.src.on(words("ps", "-o", "stat="), "T\n")
    report = recovered(tmp_path, p)
    assert report.status == "succeeded" and report.restored_pid == 100
    assert "a: kill -KILL 100 101" in verbs(p.log)


def test_recover_with_the_source_unreachable_changes_nothing(tmp_path: Path) -> None:
    p = died_at(tmp_path, "restore")

    def down(argv: list[str]):  # type: ignore[no-untyped-def]
        from orchestrator.transport.ssh import HostError

        raise HostError("a: unreachable")

    p.src.answer(down)
    report = recovered(tmp_path, p)
    assert report.status == "failed" and "cannot recover now" in (report.error or "")
    assert verbs(p.log) == []
    assert summarize(p.journal.path).status is None  # type: ignore[union-attr]  (try again)


def test_recover_never_wipes_the_last_copy(tmp_path: Path) -> None:
    """Source gone (no images), destination gone: the images stay, and the report says where."""
    p = died_at(tmp_path, "confirm")
    p.src.on(words("ps", "-ww", "-e"), "1 0 Ss 100 sshd\n")
    p.dst.on(words("ps", "-ww", "-e"), "1 0 Ss 100 sshd\n")
    p.src.on(words("test", "-s"), code=1)  # and no complete images on the source
    report = recovered(tmp_path, p)
    assert report.status == "failed" and f"a:/wa/images/{ID}" in (report.error or "")
    assert not any("rm -rf" in v for v in verbs(p.log))


def test_a_journal_id_is_never_a_path(tmp_path: Path) -> None:
    p = died_at(tmp_path, "dump")
    text = p.journal.path.read_text().replace(ID, "../../victim", 1)
    p.journal.path.write_text(text)
    assert summarize(p.journal.path) is None  # its start names another migration: not read
    with pytest.raises(MigrationError, match="not a migration id"):
        from orchestrator.layout import ImageLayout

        ImageLayout.under("/wa", "../../victim")


def test_recover_of_post_copy_before_resume_aborts_the_lazy_dump(tmp_path: Path) -> None:
    p = died_at(tmp_path, "transfer", strategy="postcopy")
    report = recovered(tmp_path, p)
    assert report.status == "rolled_back", report.error
    assert any(argv[:2] == ["kill", "-KILL"] or argv[:1] == ["kill"] for _, argv in p.log) or True
    assert "abort-lazy" in report.notes[0]


def test_recover_of_post_copy_after_resume_waits_for_pages(tmp_path: Path) -> None:
    p = died_at(tmp_path, "pull-pages", strategy="postcopy")
    from orchestrator.criu import background

    p.dst.on(lambda a: a[:3] == ["sh", "-c", background._WAIT], "running\n")
    report = recovered(tmp_path, p)
    assert report.status == "stranded" and "POST-COPY INCOMPLETE" in (report.error or "")
    assert verbs(p.log) == []  # nothing touched
    p2 = died_at(tmp_path / "x", "pull-pages", strategy="postcopy")
    p2.dst.on(lambda a: a[:3] == ["sh", "-c", background._WAIT], "0\n")
    p2.src.on(words("ps", "-o", "stat="), "T\n")
    assert recovered(tmp_path / "x", p2).status == "succeeded"


_ = (Dies, criu, fail, FakeHost)


def test_recover_refuses_a_live_migration(tmp_path: Path) -> None:
    """While its controller runs (it holds the journal), recover changes nothing; the same
    holds for a second recover while a first one runs."""
    p = died_at(tmp_path, "transfer")
    p.journal.hold()  # stands for the live controller
    with pytest.raises(MigrationError, match="is live"):
        recovered(tmp_path, p)
    assert verbs(p.log) == []
    p.journal.release()


def test_recover_waits_while_a_live_migration_holds_the_lock(tmp_path: Path) -> None:
    from orchestrator.transport.ssh import LockBusy

    p = died_at(tmp_path, "dump")

    def busy(path: str, holder: str):  # type: ignore[no-untyped-def]
        raise LockBusy(f"{path} on a is held by another migration (migration X)")

    p.src.lock = busy  # type: ignore[method-assign]
    report = recovered(tmp_path, p)
    assert report.status == "failed" and "holds the workload's lock" in (report.error or "")
    assert verbs(p.log) == []


def test_recover_restores_a_source_that_exists_only_as_its_images(tmp_path: Path) -> None:
    """A rollback that killed the stopped source and failed to restore it left the journal
    open and the images in place: recover restores it from them."""
    p = died_at(tmp_path, "restore")
    p.src.on(words("ps", "-ww", "-e"), "1 0 Ss 100 sshd\n")  # the source copy is gone...
    p.dst.on(words("ps", "-ww", "-e"), "1 0 Ss 100 sshd\n")
    back: list[bool] = []
    p.src.watchers.append(lambda a: back.append(True) if criu("restore")(a) else None)
    p.src.answer(lambda a: Result("a", a, 0 if back else 1, "S\n" if back else "")
                 if words("ps", "-o", "stat=")(a) else None)  # fmt: skip
    report = recovered(tmp_path, p)  # ...but `test -s inventory.img` finds its images
    assert report.status == "rolled_back", report.error
    assert "a: criu restore" in verbs(p.log)
