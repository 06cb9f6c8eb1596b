"""The real lab for integration tests: built once per session, always torn down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@pytest.fixture(scope="session")
def lab() -> Iterator[labmod.Lab]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if not shutil.which("criu"):
        pytest.fail("criu is not on PATH: run scripts/setup-host first")
    base = Path(tempfile.mkdtemp(prefix="migrate-lab-", dir="/run"))  # keeps sshd StrictModes on
    made = None
    try:
        made = labmod.up(base / "lab", hosts=2)
        yield made
    finally:
        labmod.down(base / "lab")
        shutil.rmtree(base, ignore_errors=True)


def on(lab: labmod.Lab, host: str, script: str, *args: str, check: bool = True) -> str:
    """Run a shell script inside a lab host's namespaces; its stdout."""
    argv = labmod.exec_argv(lab, host, ["sh", "-c", script, "sh", *args])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"on {host}: {script!r} exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def migrate(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
