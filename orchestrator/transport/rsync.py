"""Host-to-host rsync: the source pushes a directory to the destination over its own ssh."""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestrator.config import HostConfig, Policy
from orchestrator.transport.ssh import quote


class RsyncError(Exception):
    """rsync failed (e.g. the destination disk is full): another attempt would fail too."""


class LinkError(RsyncError):
    """rsync failed because the link broke or stalled: worth another attempt."""


# rsync's exit codes for a broken or stalled link (socket, protocol stream, timeouts, ssh).
RETRYABLE = {10, 12, 30, 35, 255}
_FATAL = ("No space left on device", "Disk quota exceeded", "Read-only file system",
          "Permission denied")  # fmt: skip


def failure(exit_code: int, stderr: str, what: str) -> RsyncError:
    """The error for a failed rsync, naming its first cause (not the last echo of it)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    cause = next((ln for ln in lines if any(f in ln for f in _FATAL)), None)
    first = cause or next((ln for ln in lines if ln.startswith("rsync")), None)
    reason = first or (lines[-1] if lines else "no output")
    msg = f"{what} failed (exit {exit_code}): {reason}"
    if cause or exit_code not in RETRYABLE:
        return RsyncError(msg)
    return LinkError(msg)


def ssh_command(
    src: HostConfig, dst: HostConfig, policy: Policy, link: str | None = None
) -> list[str]:
    """The ssh command the source uses to reach the destination (strict host keys, no prompts).

    With `link`, it rides on the master connection at that control socket if one is open
    (opened before the freeze, so no ssh handshake happens inside it), else connects directly.
    """
    key = src.rsync_key or src.key
    known = src.rsync_known_hosts or src.known_hosts
    mux = ["-o", "ControlMaster=no", "-o", f"ControlPath={link}"] if link else []
    return [
        "ssh",
        *mux,
        "-i", key,
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={int(policy.connect_timeout)}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-p", str(dst.port),
        "-l", dst.user,
    ]  # fmt: skip


def push_argv(
    src: HostConfig,
    dst: HostConfig,
    policy: Policy,
    src_dir: str,
    dst_dir: str,
    link: str | None = None,
    mirror: bool = False,
) -> list[str]:
    """rsync argv to run ON the source: push src_dir/ into dst_dir/ on the destination.
    Symlinks (a pre-copy dump's `parent`) are copied as symlinks; files already there with the
    same size and time are not sent again. With mirror, dst_dir becomes an exact copy (made if
    missing, files not in src_dir deleted): for what travels with a container's images (its
    bundle, config, rootfs)."""
    return [
        *_rsync(src, dst, policy, link),
        *(["--mkpath", "--delete", "-HAX"] if mirror else []),
        src_dir.rstrip("/") + "/",
        f"{dst.address}:{dst_dir.rstrip('/')}/",
    ]


def paths_argv(
    src: HostConfig, dst: HostConfig, policy: Policy, paths: Sequence[str], link: str | None
) -> list[str]:
    """rsync argv to run ON the source: push each absolute path to the same path on dst."""
    return [*_rsync(src, dst, policy, link), "--relative", *paths, f"{dst.address}:/"]


def _rsync(src: HostConfig, dst: HostConfig, policy: Policy, link: str | None) -> list[str]:
    return [
        "rsync",
        "-a",
        "--partial",
        "--stats",
        "--numeric-ids",
        "--protect-args",
        # rsync's own stall timeout must fire before the controller gives up on the command.
        f"--timeout={max(1, int(min(policy.stall_timeout, policy.command_timeout / 2)))}",
        *([f"--bwlimit={policy.bwlimit}"] if policy.bwlimit else []),
        *(["--compress"] if policy.compress else []),
        "-e",
        quote(ssh_command(src, dst, policy, link)),
    ]


def probe_argv(src: HostConfig, dst: HostConfig, policy: Policy) -> list[str]:
    """Can the source reach the destination the way rsync will? (read-only)"""
    return [*ssh_command(src, dst, policy), dst.address, "true"]


# Open a master connection that outlives this command (ControlPersist): its stdio must not be
# the session's, or the session would wait for it. Errors go to a file and are shown on failure.
_DETACHED = 'log=$1; shift; "$@" </dev/null >/dev/null 2>"$log" || { cat -- "$log" >&2; exit 1; }'


def open_link_argv(
    src: HostConfig, dst: HostConfig, policy: Policy, link: str, log: str
) -> list[str]:
    """Run on the source: open a persistent master connection to dst at control socket link."""
    ssh = ssh_command(src, dst, policy)
    master = ["-o", "ControlMaster=yes", "-o", f"ControlPath={link}", "-o", "ControlPersist=60"]
    return ["sh", "-c", _DETACHED, "sh", log, *ssh, *master, dst.address, "true"]


def forward_argv(
    src: HostConfig,
    dst: HostConfig,
    policy: Policy,
    link: str,
    port: int,
    cancel: bool = False,
    reverse: bool = False,
) -> list[str]:
    """Run on the source: (stop) forwarding its 127.0.0.1:port to the destination's (with
    reverse, the destination's to the source's), inside the ssh link, so that page traffic is
    encrypted and page servers listen on loopback only."""
    spec = f"127.0.0.1:{port}:127.0.0.1:{port}"
    op = "cancel" if cancel else "forward"
    way = "-R" if reverse else "-L"
    return [*ssh_command(src, dst, policy, link), "-O", op, way, spec, dst.address]


def close_link_argv(src: HostConfig, dst: HostConfig, policy: Policy, link: str) -> list[str]:
    """Run on the source: close the master connection (best effort)."""
    return [*ssh_command(src, dst, policy, link), "-O", "exit", dst.address]


_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")


def bytes_sent(stats: str) -> int:
    """Bytes rsync sent, from its --stats output (0 if absent)."""
    m = _SENT.search(stats)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else 0
