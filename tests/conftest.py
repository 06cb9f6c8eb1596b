"""Shared fixtures: the real lab (built once per session, always torn down)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.containerkit import container, podman_image, rootfs, stock_lxc  # noqa: F401 (fixtures)
from tests.labkit import counter_pids, on


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lab's own tests build and remove labs: run them before the shared lab is up."""
    items.sort(key=lambda item: 0 if item.path.name == "test_lab.py" else 1)


@pytest.fixture(scope="session")
def lab() -> Iterator[labmod.Lab]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if not shutil.which("criu"):
        pytest.fail("criu is not on PATH: run scripts/setup-host first")
    base = Path(tempfile.mkdtemp(prefix="migrate-lab-", dir="/run"))  # keeps sshd StrictModes on
    try:
        yield labmod.up(base / "lab", hosts=3)
    finally:
        labmod.down(base / "lab")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cleanup(lab: labmod.Lab) -> Iterator[list[Path]]:
    """Tests append their workloads' count files; any copy left on any host is killed by pid."""
    files: list[Path] = []
    yield files
    for f in files:
        for host in lab.names:
            if not lab.host(host).sshd_pid:
                continue
            pids = counter_pids(lab, host, f)
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what tests measured (record_property("measured", "...")): gaps, freezes."""
    lines = [
        f"{rep.nodeid.split('::')[-1]}: {value}"
        for rep in terminalreporter.stats.get("passed", [])
        for key, value in rep.user_properties
        if key == "measured"
    ]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)
