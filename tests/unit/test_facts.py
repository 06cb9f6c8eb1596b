"""Host facts: the parser over recorded outputs (tests/unit/facts/*.json: real runs of the
command on a machine, and crafted failures), and the command itself run here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator import facts
from orchestrator.config import HostConfig, Policy
from orchestrator.transport.ssh import HostError, Result
from tests.unit.fakehost import FakeHost

CASES = sorted((Path(__file__).parent / "facts").glob("*.json"))
FIELDS = {f.name for f in dataclasses.fields(facts.HostFacts)}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_parse_recorded(path: Path) -> None:
    case = load(path)
    assert set(case["expected"]) == FIELDS, "a case states every field"
    workdir = case.get("args", {}).get("workdir", "")
    got = facts.parse(case["host"], case["stdout"], case["exit_code"], case.get("stderr", ""),
                      workdir)  # fmt: skip
    assert as_json(dataclasses.asdict(got)) == case["expected"], case["description"]


@pytest.mark.parametrize(
    "path", [p for p in CASES if p.stem.startswith("real-")], ids=lambda p: p.stem
)
def test_real_recordings_match_the_script(path: Path) -> None:
    """A real recording is only evidence for the script that made it: record it again
    (`python -m tests.unit.facts.record`) when the script changes."""
    sha = hashlib.sha256(facts.SCRIPT.encode()).hexdigest()
    assert load(path)["script_sha256"] == sha


def test_cases_cover_the_failures() -> None:
    names = {p.stem for p in CASES}
    for wanted in (
        "real-ok",
        "real-criu-missing",
        "real-rsync-missing",
        "real-workdir-missing",
        "criu-check-fails-vdso",
        "features-partly-missing",
        "truncated-in-features",
        "garbage",
    ):
        assert wanted in names


def test_argv_passes_values_as_arguments() -> None:
    evil = "/srv/it's $(reboot) `reboot`; rm -rf /"
    argv = facts.argv(evil, evil, ["uffd-noncoop", "mem_dirty_track"], ["python3"])
    assert argv[:4] == ["sh", "-c", facts.SCRIPT, "sh"]
    assert argv[4:] == [evil, evil, "2", "uffd-noncoop", "mem_dirty_track", "python3"]
    assert facts.argv("criu", "/w", [], []) == ["sh", "-c", facts.SCRIPT, "sh", "criu", "/w", "0"]


@pytest.mark.parametrize("bad", ["", "two words", "new\nline", "a;b"])
def test_argv_refuses_names_that_would_break_the_output(bad: str) -> None:
    with pytest.raises(ValueError):
        facts.argv("criu", "/w", [bad], [])
    with pytest.raises(ValueError):
        facts.argv("criu", "/w", [], [bad])


def test_script_runs_here(tmp_path: Path) -> None:
    """The script itself, in this machine's sh: odd paths arrive intact, a missing workdir is
    measured at its nearest parent, a missing criu is reported, not fatal."""
    odd = tmp_path / "it's a $(dir)"
    odd.mkdir()
    argv = facts.argv(
        str(tmp_path / "no-criu"),
        str(odd / "not" / "yet"),
        ["uffd-noncoop"],
        ["sh", "no-such-program-here"],
    )
    r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    got = facts.parse("here", r.stdout, r.returncode, r.stderr)
    assert got.error == ""
    assert got.criu_version is None and not got.criu_ok
    assert "not found" in got.criu_error
    assert got.free_kb > 0
    assert got.features == ()
    assert got.commands == ("sh",)
    assert got.lacks_commands(["sh", "no-such-program-here"]) == ["no-such-program-here"]


def test_problems_and_ok() -> None:
    good = facts.HostFacts("a", (4, 2, 1), True, "", True, 1, ("uffd-noncoop",), 4194304)
    assert good.ok and good.problems() == []
    assert good.lacks_features(["mem_dirty_track", "uffd-noncoop"]) == ["mem_dirty_track"]
    missing = dataclasses.replace(
        good, criu_version=None, criu_ok=False, criu_error="not found", rsync=False
    )
    assert not missing.ok
    assert missing.problems() == [
        "a: criu not found or unusable (not found)",
        "a: rsync is not installed",
    ]
    failing = dataclasses.replace(good, criu_ok=False, criu_error="Error (x.c:1): vdso")
    assert failing.problems() == ["a: `criu check` failed: Error (x.c:1): vdso"]
    unreachable = facts.HostFacts("a", error="a: connection refused")
    assert not unreachable.ok and unreachable.problems() == ["a: connection refused"]


def _host(responder: Any) -> FakeHost:
    cfg = HostConfig("a", "198.18.0.1", "/k", "/kh", workdir="/wa", criu="/opt/criu/criu")
    return FakeHost(cfg, Policy(), replies=[responder])


def test_gather_runs_one_read_only_command() -> None:
    recorded = load(Path(__file__).parent / "facts" / "real-ok.json")
    seen: list[list[str]] = []

    def respond(argv: list[str]) -> Result:
        seen.append(argv)
        return Result("a", argv, recorded["exit_code"], recorded["stdout"])

    host = _host(respond)
    host.dry_run = True  # read-only: runs even in a dry run
    got = facts.gather(host, ["uffd-noncoop"], ["python3"])
    assert seen == [facts.argv("/opt/criu/criu", "/wa", ["uffd-noncoop"], ["python3"])]
    assert got.ok and got.host == "a" and got.criu_version == (4, 2, 1)
    assert host.planned == []


def test_gather_maps_host_errors() -> None:
    def respond(argv: list[str]) -> Result:
        raise HostError("a: connection refused")

    got = facts.gather(_host(respond))
    assert got == facts.HostFacts("a", error="a: connection refused")
    assert not got.ok


def test_the_script_prints_the_markers_the_parser_reads() -> None:
    for marker in (f"{facts.BEGIN} %s", f"{facts.END} %s %s", facts.DONE):
        assert marker in facts.SCRIPT


def _wd(workdir: str, *modes: tuple[str, int, int, int]) -> facts.HostFacts:
    return facts.HostFacts("h", workdir=workdir, workdir_modes=modes)


@pytest.mark.parametrize(
    ("workdir", "modes", "says"),
    [
        # made by root under root's dirs, or under a sticky /tmp: fine
        ("/var/lib/migrate", [("0", 0, 0, 0o700), ("1", 0, 0, 0o755), ("2", 0, 0, 0o755),
                              ("3", 0, 0, 0o755)], None),
        ("/var/lib/migrate", [("images", 0, 0, 0o700), ("locks", 0, 0, 0o700),
                              ("0", 0, 0, 0o755), ("1", 0, 0, 0o775)], None),  # group root
        ("/tmp/mig", [("0", 0, 0, 0o700), ("1", 0, 0, 0o1777), ("2", 0, 0, 0o755)], None),
        ("/srv/a/b", [("2", 0, 0, 0o755), ("3", 0, 0, 0o755)], None),  # to be made in /srv
        ("/", [], None),  # unknown (an older host's answer): nothing said
        # another user's, or writable by one
        ("/tmp/mig", [("0", 65534, 65534, 0o700), ("1", 0, 0, 0o1777)],
         "/tmp/mig is owned by uid 65534, not root"),
        ("/home/u/mig", [("0", 0, 0, 0o700), ("1", 1000, 1000, 0o755)],
         "/home/u is owned by uid 1000, not root"),
        ("/tmp/mig", [("1", 0, 0, 0o1777), ("2", 0, 0, 0o755)],
         "/tmp is writable by all (mode 1777)"),  # to be made in /tmp: another could first
        ("/srv/mig", [("0", 0, 0, 0o777), ("1", 0, 0, 0o755)],
         "/srv/mig is writable by all (mode 777)"),
        ("/srv/mig", [("images", 0, 0, 0o1777), ("0", 0, 0, 0o700)],
         "/srv/mig/images is writable by all (mode 1777)"),
        ("/srv/mig", [("locks", 0, 100, 0o770), ("0", 0, 0, 0o700)],
         "/srv/mig/locks is writable by group 100 (mode 770)"),
        ("/srv/x/mig", [("0", 0, 0, 0o700), ("1", 0, 0, 0o777), ("2", 0, 0, 0o755)],
         "/srv/x is writable by all (mode 777)"),  # not sticky: mig can be swapped
    ],
)  # fmt: skip
def test_unsafe_workdir(workdir: str, modes: list, says: str | None) -> None:
    f = _wd(workdir, *modes)
    assert f.unsafe_workdir() == says
    problems = f.problems()
    if says:
        assert problems[-1].startswith(f"h: workdir {workdir}: {says}: another user"), problems
    else:
        assert not any("workdir" in p for p in problems), problems
