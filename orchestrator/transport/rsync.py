"""Host-to-host rsync: the source pushes a directory to the destination over its own ssh."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.config import HostConfig, Policy
from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import quote


class RsyncError(MigrationError):
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


@dataclass(frozen=True)
class LinkSpec:
    """The source's way to the destination: hosts, policy, and the control socket of the
    master connection on the source (None: every command connects on its own)."""

    source: HostConfig
    destination: HostConfig
    policy: Policy
    socket: str | None = None


def ssh_command(spec: LinkSpec, mux: bool = True) -> list[str]:
    """The ssh command the source uses to reach the destination (strict host keys, no prompts,
    the policy's ciphers in its order of preference).

    With `mux` and a socket, it rides on the master connection there if one is open (opened
    before the freeze, so no ssh handshake happens inside it), else connects directly."""
    src, dst, policy = spec.source, spec.destination, spec.policy
    key = src.rsync_key or src.key
    known = src.rsync_known_hosts or src.known_hosts
    mux_opts = ["-o", "ControlMaster=no", "-o", f"ControlPath={spec.socket}"]
    return [
        "ssh",
        *(mux_opts if mux and spec.socket else []),
        *(["-c", ",".join(policy.ciphers)] if policy.ciphers else []),
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


def push_argv(spec: LinkSpec, src_dir: str, dst_dir: str, mirror: bool = False) -> list[str]:
    """rsync argv to run ON the source: push src_dir/ into dst_dir/ on the destination.
    Symlinks (a pre-copy dump's `parent`) are copied as symlinks; files already there with the
    same size and time are not sent again. With mirror, dst_dir becomes an exact copy (made if
    missing, files not in src_dir deleted): for what travels with a container's images (its
    bundle, config, rootfs)."""
    return [
        *_rsync(spec),
        *(["--mkpath", "--delete", "-HAX"] if mirror else []),
        src_dir.rstrip("/") + "/",
        f"{spec.destination.address}:{dst_dir.rstrip('/')}/",
    ]


def paths_argv(spec: LinkSpec, paths: Sequence[str]) -> list[str]:
    """rsync argv to run ON the source: push each absolute path to the same path on dst."""
    return [*_rsync(spec), "--relative", *paths, f"{spec.destination.address}:/"]


def _rsync(spec: LinkSpec) -> list[str]:
    policy = spec.policy
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
        quote(ssh_command(spec)),
    ]


def probe_argv(spec: LinkSpec) -> list[str]:
    """Can the source reach the destination the way rsync will? (read-only)"""
    return [*ssh_command(spec, mux=False), spec.destination.address, "true"]


# Open a master connection that outlives this command (ControlPersist): its stdio must not be
# the session's, or the session would wait for it. Errors go to a file and are shown on failure.
_DETACHED = 'log=$1; shift; "$@" </dev/null >/dev/null 2>"$log" || { cat -- "$log" >&2; exit 1; }'


def open_argv(spec: LinkSpec, log: str) -> list[str]:
    """Run on the source: open a persistent master connection at the control socket."""
    assert spec.socket
    master = ["-o", "ControlMaster=yes", "-o", f"ControlPath={spec.socket}",
              "-o", "ControlPersist=60"]  # fmt: skip
    return ["sh", "-c", _DETACHED, "sh", log, *ssh_command(spec, mux=False), *master,
            spec.destination.address, "true"]  # fmt: skip


def forward_argv(spec: LinkSpec, forward: str, cancel: bool = False) -> list[str]:
    """Run on the source: (stop) forwarding inside the master connection, `forward` as ssh's
    -L takes it (here: the page channel's Unix socket paths, LOCAL:REMOTE), so that page
    traffic is encrypted between hosts and never on a TCP port."""
    op = "cancel" if cancel else "forward"
    return [*ssh_command(spec), "-O", op, "-L", forward, spec.destination.address]


def close_argv(spec: LinkSpec) -> list[str]:
    """Run on the source: close the master connection (best effort)."""
    return [*ssh_command(spec), "-O", "exit", spec.destination.address]


_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")


def bytes_sent(stats: str) -> int:
    """Bytes rsync sent, from its --stats output (0 if absent)."""
    m = _SENT.search(stats)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else 0
