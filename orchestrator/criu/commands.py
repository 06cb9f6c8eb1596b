"""CRIU command lines, built from typed options (never from strings pasted together)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DUMP_LOG = "dump.log"
PRE_DUMP_LOG = "pre-dump.log"
RESTORE_LOG = "restore.log"


@dataclass(frozen=True)
class DumpOptions:
    pid: int
    images_dir: str
    leave_stopped: bool = True
    ext_mount_map_auto: bool = False
    tcp_established: bool = False
    skip_in_flight: bool = False
    network_lock: str | None = None  # nftables | iptables
    track_mem: bool = False  # soft-dirty tracking: the next dump writes only changed pages
    prev_images_dir: str | None = None  # relative to images_dir: pages already there are skipped
    # #14 page channel: pages over an already-connected Unix socket (pagechannel.dump_flags)
    channel_flags: Sequence[str] = ()
    file_locks: bool = False  # dump the tree's file locks (POSIX, flock, OFD)
    extra: Sequence[str] = ()


@dataclass(frozen=True)
class RestoreOptions:
    images_dir: str
    pidfile: str
    ext_mount_map_auto: bool = False
    root: str | None = None
    tcp_established: bool = False
    tcp_close: bool = False
    network_lock: str | None = None
    veths: Sequence[tuple[str, str, str]] = ()  # (inside name, host name, host bridge)
    lazy_pages: bool = False  # post-copy: pages come from a `criu lazy-pages` daemon
    file_locks: bool = False  # take the dumped file locks back
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
    argv += _net(o.tcp_established, o.network_lock)
    if o.skip_in_flight:
        argv.append("--skip-in-flight")
    if o.file_locks:
        argv.append("--file-locks")
    argv += list(o.channel_flags)  # #14
    return argv + _track(o) + list(o.extra)


def pre_dump(criu: str, o: DumpOptions) -> list[str]:
    """A pre-copy round: the tree's memory into images_dir while it runs on (never stopped)."""
    argv = [criu, "pre-dump", "-t", str(o.pid), "-D", o.images_dir, "-o", PRE_DUMP_LOG, "-v4"]
    if o.ext_mount_map_auto:
        argv += ["--ext-mount-map", "auto"]
    return argv + _track(o) + list(o.extra)


def _track(o: DumpOptions) -> list[str]:
    argv = ["--track-mem"] if o.track_mem else []
    return argv + (["--prev-images-dir", o.prev_images_dir] if o.prev_images_dir else [])


def _net(tcp_established: bool, network_lock: str | None) -> list[str]:
    argv = ["--tcp-established"] if tcp_established else []
    return argv + (["--network-lock", network_lock] if network_lock else [])


def restore(criu: str, o: RestoreOptions) -> list[str]:
    argv = [criu, "restore", "-d", "-D", o.images_dir, "-o", RESTORE_LOG, "-v4"]
    argv += ["--pidfile", o.pidfile]
    if o.ext_mount_map_auto:
        argv += ["--ext-mount-map", "auto"]
    if o.root:
        argv += ["--root", o.root]
    argv += _net(o.tcp_established, o.network_lock)
    if o.tcp_close:
        argv.append("--tcp-close")
    for inside, outside, bridge in o.veths:
        argv += ["--external", f"veth[{inside}]:{outside}@{bridge}"]
    if o.lazy_pages:
        argv.append("--lazy-pages")
    if o.file_locks:
        argv.append("--file-locks")
    return argv + list(o.extra)


def feature(criu: str, name: str) -> list[str]:
    return [criu, "check", "--feature", name]


_VERSION = re.compile(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from `criu --version` output."""
    m = _VERSION.search(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
