"""CRIU command lines, built from typed options (never from strings pasted together)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"


@dataclass(frozen=True)
class DumpOptions:
    pid: int
    images_dir: str
    leave_stopped: bool = True
    ext_mount_map_auto: bool = False
    extra: Sequence[str] = ()


@dataclass(frozen=True)
class RestoreOptions:
    images_dir: str
    pidfile: str
    ext_mount_map_auto: bool = False
    root: str | None = None
    extra: Sequence[str] = ()


def check(criu: str) -> list[str]:
    return [criu, "check"]


def version(criu: str) -> list[str]:
    return [criu, "--version"]


def dump(criu: str, o: DumpOptions) -> list[str]:
    argv = [criu, "dump", "-t", str(o.pid), "-D", o.images_dir, "-o", DUMP_LOG, "-v4"]
    if o.leave_stopped:
        argv.append("--leave-stopped")
    if o.ext_mount_map_auto:
        argv += ["--ext-mount-map", "auto"]
    return argv + list(o.extra)


def restore(criu: str, o: RestoreOptions) -> list[str]:
    argv = [criu, "restore", "-d", "-D", o.images_dir, "-o", RESTORE_LOG, "-v4"]
    argv += ["--pidfile", o.pidfile]
    if o.ext_mount_map_auto:
        argv += ["--ext-mount-map", "auto"]
    if o.root:
        argv += ["--root", o.root]
    return argv + list(o.extra)


_VERSION = re.compile(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from `criu --version` output."""
    m = _VERSION.search(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
