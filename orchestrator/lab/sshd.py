"""Keys and one real sshd per lab host, run as pid 1 of the host's own pid namespace."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from .proc import children, exe, run, start_time, wait_for
from .state import LabError, LabHost

SSHD = "/usr/sbin/sshd"

# Where container runtimes keep state (runc, LXC, Podman) and where bundles live: each lab host
# gets its own copy (a bind mount in its mount namespace), as separate machines would have.
PRIVATE_DIRS = ("/run/runc", "/run/lxc", "/run/containers", "/run/libpod", "/var/lib/lxc",
                "/var/lib/containers", "/srv")  # fmt: skip

# Runs as pid 1 of the new pid namespace, in the host's netns and a fresh mount + UTS namespace.
# $1 name, $2 ns_last_pid start value, $3 sshd_config, $4 sshd log, $5 the host's private root,
# $6 this machine's cgroup mounts (`ip netns exec` hid them with a fresh /sys; runtimes need
# them), one "TARGET TYPE OPTIONS" a line; PRIVATE_DIRS follow.
_INIT = """\
echo "$1" > /proc/sys/kernel/hostname || echo "migrate-lab: could not set hostname $1" >&2
name=$1 last=$2 config=$3 log=$4 private=$5 cgroups=$6; shift 6
printf '%s\\n' "$cgroups" | while read -r target type options; do
  [ -n "$target" ] || continue
  mkdir -p "$target"; mount -t "$type" -o "$options" "$type" "$target" \
    || echo "migrate-lab: cannot mount $type at $target" >&2
done
for d; do
  mkdir -p "$d" "$private$d" && mount --bind "$private$d" "$d" \
    || echo "migrate-lab: $d is not private to $name" >&2
done
set -- "$name" "$last" "$config" "$log"
echo "$2" > /proc/sys/kernel/ns_last_pid \
  || echo "migrate-lab: could not set ns_last_pid to $2: pids on this host may clash" >&2
exec /usr/sbin/sshd -D -f "$3" -E "$4"
"""

_CONFIG = """\
# migrate lab: sshd for {name} (written by orchestrator.lab; key-only root login)
ListenAddress {address}
Port 22
AddressFamily inet
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes {strict_modes}
PermitUserEnvironment no
X11Forwarding no
PrintMotd no
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
"""


def keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key pair at path (no passphrase); return the public key line."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    os.chmod(path, 0o600)
    return path.with_suffix(".pub").read_text().strip()


def write_config(host: LabHost, client_pub: str, strict_modes: bool = True) -> str:
    """Host key, authorized_keys and sshd_config under host.home/sshd (0700).
    Returns the host's known_hosts line (``ADDRESS ssh-ed25519 AAAA...``)."""
    d = host.sshd_config.parent
    host_key = d / "ssh_host_ed25519_key"
    pub = keygen(host_key, f"root@{host.name}")
    authorized = d / "authorized_keys"
    authorized.write_text(client_pub + "\n")
    os.chmod(authorized, 0o600)
    host.sshd_config.write_text(
        _CONFIG.format(
            name=host.name,
            address=host.address,
            host_key=host_key,
            authorized_keys=authorized,
            strict_modes="yes" if strict_modes else "no",
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    run([SSHD, "-t", "-f", str(host.sshd_config)])  # syntax and key check before starting
    key_type, key_b64 = pub.split()[:2]
    return f"{host.address} {key_type} {key_b64}"


def launch(host: LabHost) -> subprocess.Popen[bytes]:
    """Start the host: detached (own session), stdio to console.log. Returns the launcher,
    ``unshare`` (root pid ns), whose only child becomes the host's pid 1 (sh, then sshd)."""
    argv = [
        "ip", "netns", "exec", host.netns,
        "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--uts",
        "sh", "-c", _INIT, "sh", host.name, str(host.pid_base), str(host.sshd_config),
        str(host.sshd_log), str(host.home / "root"), cgroup_mounts(), *PRIVATE_DIRS,
    ]  # fmt: skip
    with open(host.console_log, "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


def cgroup_mounts() -> str:
    """This machine's cgroup file systems (and the tmpfs holding them), as _INIT mounts them."""
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        target, fstype, options = fields[4], fields[sep + 1], fields[sep + 3]
        if target.startswith("/sys/fs/cgroup") and fstype in ("cgroup", "cgroup2", "tmpfs"):
            lines.append(f"{target} {fstype} {options}")
    return "\n".join(lines)


def find_pid1(host: LabHost, launcher: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Wait until the launcher's child has exec'd sshd; record it as host.sshd_pid/sshd_start."""
    found: list[int] = []

    def ready() -> bool:
        if launcher.poll() is not None:
            raise LabError(f"{host.name} died at start (exit {launcher.returncode}): {tail(host)}")
        for pid in children(launcher.pid):
            if exe(pid) == SSHD:
                found.append(pid)
                return True
        return False

    wait_for(ready, timeout, f"sshd of {host.name} to start")
    start = start_time(found[0])
    if start is None:
        raise LabError(f"sshd of {host.name} exited right after start: {tail(host)}")
    host.sshd_pid, host.sshd_start = found[0], start


def listening(host: LabHost) -> bool:
    """True once host's sshd listens on address:22, read from the host netns's /proc/PID/net/tcp
    (no probe connection, so no noise in the sshd log)."""
    want = "{:08X}:0016".format(int.from_bytes(socket.inet_aton(host.address), "little"))
    try:
        with open(f"/proc/{host.sshd_pid}/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return False
    return any(r[1] == want and r[3] == "0A" for r in rows)  # 0A: LISTEN


def wait_listening(host: LabHost, timeout: float = 10) -> None:
    """Wait until host's sshd listens; LabError (with its last log line) if it does not."""
    try:
        wait_for(lambda: listening(host), timeout, f"sshd of {host.name} to listen")
    except LabError as e:
        raise LabError(f"{e}: {tail(host)}") from e


def tail(host: LabHost) -> str:
    """Last line of the host's console/sshd logs, for error messages."""
    for log in (host.console_log, host.sshd_log):
        try:
            lines = log.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if lines:
            return f"{lines[-1]} (see {log})"
    return f"no log output (see {host.home})"


def ssh_argv(key: Path, known_hosts: Path, address: str, command: list[str]) -> list[str]:
    """Plain OpenSSH with strict host-key checking against the lab's known_hosts."""
    return [
        "ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        f"root@{address}", "--", *command,
    ]  # fmt: skip
