"""Running commands, and processes identified by (pid, start time) so a reused pid is never hit."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

from .state import LabError


def run(
    argv: list[str], check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run argv, capturing output; on failure (if check) raise LabError with its stderr."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise LabError(f"{argv[0]} not found: install it first") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"`{' '.join(argv)}` timed out after {timeout:g}s") from e
    if check and res.returncode != 0:
        err = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise LabError(f"`{' '.join(argv)}` failed: {err[-1] if err else f'exit {res.returncode}'}")
    return res


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None if pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parens: split after its closing paren.
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Start time of a live pid in clock ticks since boot (field 22); None if gone or zombie."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def children(pid: int) -> list[int]:
    """Pids whose parent is pid (a /proc scan: works without CONFIG_PROC_CHILDREN)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def is_same(pid: int, start: int) -> bool:
    """True if pid is still the process that was started at ``start``."""
    return pid > 0 and start_time(pid) == start


def kill(pid: int, start: int, timeout: float = 10) -> bool:
    """SIGKILL pid if (and only if) it is still the process started at ``start``; wait for it
    to exit. Returns True if it was killed, False if it was already gone."""
    if pid <= 0:
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd pins the identity: checked after opening it, a reused pid cannot slip in.
        if not is_same(pid, start):
            reap(pid)
            return False
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        # The pidfd turns readable when the process has exited.
        if not select.select([fd], [], [], timeout)[0]:
            raise LabError(f"pid {pid} did not exit within {timeout:g}s of SIGKILL")
        reap(pid)
        return True
    finally:
        os.close(fd)


def reap(pid: int) -> None:
    """Collect pid's exit status if it is a zombie child of ours (e.g. the launcher of an sshd
    started by this same process), so no zombie is left behind."""
    fields = _stat(pid)
    if fields is None or fields[0] != "Z":
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for(cond: Callable[[], object], timeout: float, what: str, step: float = 0.01) -> None:
    """Poll ``cond`` until it returns true; LabError after timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)
