"""`migrate gc`: the survey's parser and the rule for what is garbage (pure)."""

from __future__ import annotations

from orchestrator import gc

ENDED, OPEN, FOREIGN = "20261203T010101-aaaaaa", "20261203T020202-bbbbbb", "20261203T030303-cccccc"
OUTPUT = f"""@@images
{ENDED}
ssh-{ENDED}
ssh-{ENDED}.log
{OPEN}
{FOREIGN}
notes.txt
@@locks
free /wa/locks/pid-100.lock
held /wa/locks/pid-200.lock
@@procs
    1 sshd: /usr/sbin/sshd -D
  300 criu page-server -D /wa/images/{ENDED} --address 127.0.0.1 --port 4242 -d
  301 ssh -o ControlMaster=yes -o ControlPath=/wa/images/ssh-{OPEN} 198.18.0.2 true
  302 criu dump -t 9 -D /elsewhere/images/{ENDED}
"""


def test_survey_output_is_parsed_into_leftovers() -> None:
    found = gc.parse("a", "/wa", OUTPUT)
    kinds = [(x.kind, x.migration) for x in found]
    assert kinds == [
        ("images", ENDED), ("socket", ENDED), ("log", ENDED), ("images", OPEN),
        ("images", FOREIGN), ("images", None), ("lock", None), ("process", ENDED),
        ("process", OPEN),
    ]  # fmt: skip
    assert found[7].pid == 300 and found[6].what == "/wa/locks/pid-100.lock"


def test_only_what_no_migration_owns_is_garbage() -> None:
    verdicts = gc.classify(gc.parse("a", "/wa", OUTPUT), ended={ENDED}, open_={OPEN})
    garbage = {(v.leftover.kind, v.leftover.migration) for v in verdicts if v.garbage}
    assert garbage == {("images", ENDED), ("socket", ENDED), ("log", ENDED), ("lock", None),
                       ("process", ENDED)}  # fmt: skip
    kept = {v.leftover.migration: v.why for v in verdicts if not v.garbage}
    assert "unfinished" in kept[OPEN] and "--unknown" in kept[FOREIGN]
    with_unknown = gc.classify(gc.parse("a", "/wa", OUTPUT), {ENDED}, {OPEN}, unknown_ok=True)
    assert any(v.garbage and v.leftover.migration == FOREIGN for v in with_unknown)
    assert not any(v.garbage and v.leftover.migration == OPEN for v in with_unknown)


def test_an_evacuations_master_log_is_garbage_once_its_master_is_gone() -> None:
    """An evacuation's shared ssh master (named by no migration) leaves its log when its
    controller died: garbage once neither its socket nor its process is there; kept while the
    master lives (its evacuation may still run)."""
    out = """@@images
ssh-evac-aaaaaa-0
ssh-evac-aaaaaa-0.log
ssh-evac-bbbbbb-1.log
ssh-evac-cccccc-2.log
@@locks
@@procs
  400 ssh: /wa/images/ssh-evac-cccccc-2 [mux]
"""
    verdicts = gc.classify(gc.parse("a", "/wa", out), ended=set(), open_=set())
    garbage = [v.leftover.what for v in verdicts if v.garbage]
    assert garbage == ["/wa/images/ssh-evac-bbbbbb-1.log"]
    assert all("left alone" in v.why for v in verdicts if not v.garbage)
