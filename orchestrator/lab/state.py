"""Lab data model, naming scheme and the JSON state file (``lab_dir/lab.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import MigrationError

DEFAULT_DIR = Path("/run/migrate-lab")
STATE_FILE = "lab.json"
STATE_VERSION = 1

MAX_HOSTS = 26  # host-a .. host-z
LAB_NET = "198.18.0.0/15"  # held unreachable in the root namespace while the lab exists
BRIDGE = "migbr0"  # the "switch" in the root namespace
BRIDGE_ADDR = "198.18.0.254"
PREFIX_LEN = 24
BRIDGE_MAC = "02:6d:67:00:00:fe"
PID_STRIDE = 150000  # host i hands out pids from (i + 1) * PID_STRIDE + 1


class LabError(MigrationError):
    """A lab operation failed; the message is one operator-readable line."""


# The client: a plain namespace on the same switch, for test clients of migrated workloads.
CLIENT = "client"
CLIENT_NETNS = "mig-client"
CLIENT_VETH = "migv-client"
CLIENT_ADDRESS = "198.18.0.200"
CLIENT_MAC = "02:6d:67:00:00:c8"


def host_name(i: int) -> str:
    return f"host-{chr(ord('a') + i)}"


def host_address(i: int) -> str:
    return f"198.18.0.{i + 1}"


def netns_name(i: int) -> str:
    return f"mig-{host_name(i)}"


def veth_name(i: int) -> str:
    return f"migv-{chr(ord('a') + i)}"


def eth0_mac(i: int) -> str:
    """MAC of eth0 inside host i; br0 there is pinned to it."""
    return f"02:6d:67:00:00:{i + 1:02x}"


def veth_mac(i: int) -> str:
    """MAC of host i's veth end on the root bridge."""
    return f"02:6d:67:00:01:{i + 1:02x}"


@dataclass
class LabHost:
    """One lab "machine": netns + pid/mnt/uts namespaces under its own sshd (pid 1)."""

    name: str
    index: int
    address: str
    netns: str
    veth: str
    home: Path  # lab_dir/hosts/NAME (0700): sshd files, logs
    workdir: Path  # home/work: the host's workdir in migrate.yaml
    sshd_pid: int = 0  # sshd = pid 1 of the host's pid namespace, as a ROOT-namespace pid
    sshd_start: int = 0  # its start time (clock ticks since boot), guards against pid reuse
    pid_base: int = 0  # ns_last_pid written at start: host pids begin at pid_base + 1

    @property
    def sshd_config(self) -> Path:
        return self.home / "sshd" / "sshd_config"

    @property
    def sshd_log(self) -> Path:
        return self.home / "sshd.log"

    @property
    def console_log(self) -> Path:
        return self.home / "console.log"

    @property
    def host_key_pub(self) -> Path:
        return self.home / "sshd" / "ssh_host_ed25519_key.pub"

    def ns_inode(self, kind: str = "net") -> int:
        """Inode of one of the host's namespaces (net, pid, mnt, uts), as in ``readlink
        /proc/PID/ns/KIND`` -> ``KIND:[INODE]`` for any process on that host."""
        return os.stat(f"/proc/{self.sshd_pid}/ns/{kind}").st_ino


@dataclass
class Lab:
    dir: Path
    hosts: list[LabHost]
    config_path: Path  # lab_dir/migrate.yaml
    client_key: Path  # lab_dir/client/id_ed25519 (also every host's rsync_key)
    known_hosts: Path  # lab_dir/client/known_hosts (real host keys)
    state_dir: Path  # lab_dir/state: the controller's journal dir
    complete: bool = False  # False while up() is still working (or died half way)
    strict_modes: bool = True  # sshd StrictModes (off only for a lab dir below e.g. /tmp)
    # What up() made, in order of creation; down() undoes it from this list only.
    # Entries: ["dir", path] | ["route", net] | ["link", name] | ["netns", name]
    #          | ["proc", pid, start_ticks, what]
    made: list[list[Any]] = field(default_factory=list)

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no host {name!r} in the lab (hosts: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]


@dataclass
class HostStatus:
    name: str
    address: str
    netns: str
    sshd_pid: int
    alive: bool  # sshd pid 1 running (same process as started) and its netns present


def state_path(lab_dir: Path) -> Path:
    return lab_dir / STATE_FILE


def save(lab: Lab) -> None:
    """Write the state file atomically (it is rewritten after every step of up())."""
    data = asdict(lab)
    data["version"] = STATE_VERSION
    path = state_path(lab.dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read(lab_dir: Path) -> Lab | None:
    """The lab recorded in lab_dir, or None if there is no state file."""
    path = state_path(lab_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"unreadable lab state file {path}: {e}") from e
    if data.get("version") != STATE_VERSION:
        raise LabError(f"lab state file {path} has unknown version {data.get('version')!r}")
    try:
        hosts = [
            LabHost(**{**h, "home": Path(h["home"]), "workdir": Path(h["workdir"])})
            for h in data["hosts"]
        ]
        return Lab(
            dir=Path(data["dir"]),
            hosts=hosts,
            config_path=Path(data["config_path"]),
            client_key=Path(data["client_key"]),
            known_hosts=Path(data["known_hosts"]),
            state_dir=Path(data["state_dir"]),
            complete=bool(data["complete"]),
            strict_modes=bool(data.get("strict_modes", True)),
            made=list(data["made"]),
        )
    except (KeyError, TypeError) as e:
        raise LabError(f"malformed lab state file {path}: {e}") from e
