"""Host facts against a real lab host: `facts.gather` in one round trip over ssh says what
the same commands, run one by one in the host, say."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import config as configmod
from orchestrator import facts
from orchestrator import lab as labmod
from orchestrator.criu.commands import parse_version
from orchestrator.transport.ssh import Host
from tests.labkit import config_with, on

pytestmark = pytest.mark.lab

FEATURES = ("mem_dirty_track", "uffd-noncoop", "network_lock_nftables", "tcp_half_closed")
COMMANDS = ("python3", "rsync", "no-such-program-here")
_FREE_KB = 'd=$1; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d" | tail -n 1'


def _host(config_path: Path, name: str) -> Iterator[Host]:
    config = configmod.load(config_path)
    host = Host(config.host(name), config.policy)
    try:
        yield host
    finally:
        host.close()


@pytest.fixture
def host_a(lab: labmod.Lab) -> Iterator[Host]:
    yield from _host(lab.config_path, "host-a")


def _rc(lab: labmod.Lab, host: str, script: str, *args: str) -> int:
    return int(on(lab, host, script + '; echo "$?"', *args).split()[-1])


def test_gather_says_what_direct_commands_say(lab: labmod.Lab, host_a: Host) -> None:
    got = facts.gather(host_a, FEATURES, COMMANDS)
    criu, workdir = host_a.config.criu, host_a.config.workdir

    assert got.error == "" and got.host == "host-a"
    version = on(lab, "host-a", '"$1" --version 2>&1', criu)
    assert got.criu_version == parse_version(version) is not None
    check_rc = _rc(lab, "host-a", '"$1" check >/dev/null 2>&1', criu)
    assert got.criu_ok == (check_rc == 0)
    assert got.rsync == (_rc(lab, "host-a", "rsync --version >/dev/null 2>&1") == 0)
    free = int(on(lab, "host-a", _FREE_KB, workdir).split()[3])
    assert abs(got.free_kb - free) < max(free // 100, 64 * 1024)  # the disk is shared: it moves
    pipe = int(on(lab, "host-a", "cat /proc/sys/fs/pipe-max-size"))
    assert got.pipe_max == pipe
    has = [
        f
        for f in FEATURES
        if _rc(lab, "host-a", '"$1" check --feature "$2" >/dev/null 2>&1', criu, f) == 0
    ]
    assert list(got.features) == has
    present = [c for c in COMMANDS if _rc(lab, "host-a", 'command -v "$1" >/dev/null', c) == 0]
    assert list(got.commands) == present
    assert "no-such-program-here" not in got.commands
    assert got.ok == (got.criu_ok and got.rsync)


def test_gather_reports_a_missing_criu(lab: labmod.Lab, tmp_path: Path) -> None:
    path = config_with(lab, tmp_path / "m.yaml", host_a={"criu": "/opt/no-criu-here/criu"})
    for host in _host(path, "host-a"):
        got = facts.gather(host, ("uffd-noncoop",), ("python3",))
        assert got.error == ""
        assert got.criu_version is None and not got.criu_ok
        assert "not found" in got.criu_error
        assert got.features == ()
        assert got.problems()[0].startswith("host-a: criu not found or unusable")


def test_gather_reports_an_unreachable_host(lab: labmod.Lab, tmp_path: Path) -> None:
    # 198.18.0.250: in the lab's range, no host there (its unreachable route keeps it local).
    path = config_with(lab, tmp_path / "u.yaml", host_a={"address": "198.18.0.250"})
    config = configmod.load(path)
    policy = dataclasses.replace(config.policy, retries=1, retry_deadline=1, connect_timeout=2)
    host = Host(config.host("host-a"), policy)
    try:
        got = facts.gather(host)
    finally:
        host.close()
    assert got.error and not got.ok
    assert got.problems() == [got.error]
