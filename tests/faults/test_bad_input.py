"""Bad configuration and bad command lines: one line on stderr naming the cause, exit 2, and
nothing touched anywhere: no journal, no image dirs, not even an ssh login on any host."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod
from tests.faults.kit import Case, cli, fault_config, image_dirs, journal_files

pytestmark = pytest.mark.lab

Config = dict[str, Any]
RUN = ("run", "counter", "host-a", "host-b")


def _set(path: str, value: Any) -> Callable[[Config], None]:
    """A change to the config: set the dotted key path to value."""

    def change(cfg: Config) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value

    return change


def _drop(path: str) -> Callable[[Config], None]:
    def change(cfg: Config) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        del node[last]

    return change


# id: (argv, change to the config | raw config text | None, what stderr must name)
CASES: dict[str, tuple[tuple[str, ...], Any, str]] = {
    "unknown destination host": (
        ("run", "counter", "host-a", "host-z"),
        None,
        "unknown host 'host-z'",
    ),
    "unknown source host": (("run", "counter", "nohost", "host-b"), None, "unknown host 'nohost'"),
    "unknown workload": (("run", "nosuch", "host-a", "host-b"), None, "unknown workload 'nosuch'"),
    "same source and destination": (("run", "counter", "host-a", "host-a"), None, "same host"),
    "bad ad-hoc pid": (("run", "pid:abc", "host-a", "host-b"), None, "pid must be a number"),
    "missing key file": (
        RUN,
        _set("hosts.host-b.key", "/nonexistent/id_ed25519"),
        "hosts.host-b.key: file not found",
    ),
    "missing known_hosts": (
        RUN,
        _set("hosts.host-a.known_hosts", "/nonexistent/kh"),
        "hosts.host-a.known_hosts: file not found",
    ),
    "missing address": (RUN, _drop("hosts.host-a.address"), "hosts.host-a.address: missing"),
    "unreadable YAML": (RUN, "hosts: [host-a, {\n  bad: : yaml\n", "not valid YAML"),
    "config is a list": (RUN, "- hosts\n- workloads\n", "must be a mapping"),
    "empty config": (RUN, "", "must be a mapping"),
    "missing config file": (RUN, "MISSING", "cannot read config"),
    "config is a directory": (RUN, "DIRECTORY", "cannot read config"),
    "port is a string": (
        RUN,
        _set("hosts.host-a.port", "twenty-two"),
        "hosts.host-a.port: must be an integer",
    ),
    "port out of range": (
        RUN,
        _set("hosts.host-a.port", 70000),
        "hosts.host-a.port: must be 1-65535",
    ),
    "retries is a string": (
        RUN,
        _set("policy.retries", "three"),
        "policy.retries: must be an integer",
    ),
    "timeout is a boolean": (RUN, _set("policy.connect_timeout", True), "policy.connect_timeout"),
    "hosts is a list": (RUN, _set("hosts", ["host-a", "host-b"]), "hosts: must be a mapping"),
    "unknown top-level key": (RUN, _set("polciy", {}), "polciy: unknown key"),
    "unknown host key": (RUN, _set("hosts.host-a.adress", "x"), "hosts.host-a.adress: unknown key"),
    "relative workdir": (
        RUN,
        _set("hosts.host-b.workdir", "var/lib/migrate"),
        "workdir: must be an absolute path",
    ),
    "two ways to find the pid": (RUN, _set("workloads.counter.pid", 1234), "give exactly one of"),
    "pid is a string": (
        RUN,
        _set("workloads.counter", {"pid": "1234"}),
        "workloads.counter.pid: must be an integer",
    ),
    "criu_options not a list": (
        RUN,
        _set("workloads.counter.criu_options", "--shell-job"),
        "criu_options: must be a list",
    ),
    "criu_options not an option": (
        RUN,
        _set("workloads.counter.criu_options", ["shell-job"]),
        "criu_options: bad option",
    ),
    "unknown runtime": (
        RUN,
        _set("workloads.counter.runtime", "docker"),
        "unknown runtime 'docker'",
    ),
    "bad match regex": (RUN, _set("workloads.counter", {"match": "(unclosed"}), "match: bad regex"),
    "unknown option": ((*RUN, "--frobnicate"), None, "unrecognized arguments: --frobnicate"),
    "unknown strategy": ((*RUN, "--strategy", "warp"), None, "invalid choice: 'warp'"),
    "missing argument": (("run", "counter", "host-a"), None, "required: destination"),
    "unknown command": (("teleport", "counter"), None, "invalid choice: 'teleport'"),
    "check unknown host": (("check", "host-a", "host-z"), None, "unknown host 'host-z'"),
}


def _accepted_logins(lab: labmod.Lab) -> dict[str, int]:
    """Per host, how many ssh logins its sshd has logged so far."""
    out = {}
    for h in lab.hosts:
        text = h.sshd_log.read_text(errors="replace") if h.sshd_log.exists() else ""
        out[h.name] = text.count("Accepted publickey")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_and_touches_nothing(
    lab: labmod.Lab, case: Case, tmp_path: Path, name: str
) -> None:
    argv, change, expected = CASES[name]
    case.fault = f"bad input: {name}"
    state = tmp_path / "state"
    cfg_path = fault_config(
        lab, tmp_path / "migrate.yaml", state_dir=state,
        workloads={"counter": {"pidfile": str(tmp_path / "counter.pid")}},
    )  # fmt: skip
    if callable(change):
        cfg = yaml.safe_load(cfg_path.read_text())
        change(cfg)
        cfg_path.write_text(yaml.safe_dump(cfg))
    elif change == "MISSING":
        cfg_path.unlink()
    elif change == "DIRECTORY":
        cfg_path.unlink()
        cfg_path.mkdir()
    elif isinstance(change, str):
        cfg_path.write_text(change)
    logins = _accepted_logins(lab)
    images = {h: image_dirs(lab, h) for h in lab.names}

    r = subprocess.run(
        cli(*argv, "--config", str(cfg_path)),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    case.outcome = f"exit {r.returncode}"
    case.copies = "-"

    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, f"exit {r.returncode}: {r.stdout} {r.stderr}"
    assert len(lines) == 1 and lines[0].startswith("migrate: error: "), r.stderr
    assert expected in lines[0], lines[0]
    assert r.stdout == ""
    assert journal_files(state) == [], "a journal was written"
    assert {h: image_dirs(lab, h) for h in lab.names} == images
    assert _accepted_logins(lab) == logins, "something logged in to a host"
