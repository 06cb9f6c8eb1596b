"""Helpers for tests on the real lab: run in a host, the CLI, a counter workload with state."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator import lab as labmod


def on(lab: labmod.Lab, host: str, script: str, *args: str, check: bool = True) -> str:
    """Run a shell script inside a lab host's namespaces; its stdout."""
    argv = labmod.exec_argv(lab, host, ["sh", "-c", script, "sh", *args])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"on {host}: {script!r} exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def migrate(*args: str, config: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
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


BROKEN_CRIU = """#!/bin/sh
# `restore` fails as a real CRIU error would (also `swrk`, the RPC mode through which runc and
# Podman restore); everything else is the real criu: the first one on PATH that is not this
# script (which may itself be on PATH as `criu`, e.g. for LXC).
if [ "$1" = restore ] || [ "$1" = swrk ]; then
  echo "Error (criu/cr-restore.c:1): restore refused (injected by the test)" >&2
  exit 1
fi
self=$(readlink -f "$0")
IFS=:
for d in $PATH; do
  if [ -x "$d/criu" ] && [ "$(readlink -f "$d/criu")" != "$self" ]; then exec "$d/criu" "$@"; fi
done
echo "criu not found on PATH" >&2
exit 127
"""


def failing_restore_config(lab: labmod.Lab, tmp: Path, host: str = "host-b") -> Path:
    """The lab's config with host's criu replaced by one whose restore fails."""
    broken = tmp / "criu-fails-restore"
    broken.write_text(BROKEN_CRIU)
    broken.chmod(0o755)
    return config_with(lab, tmp / "failing-restore.yaml", **{host: {"criu": str(broken)}})


def other_lab_up() -> bool:
    """Whether a lab's bridge exists in this network namespace (lab names are machine-wide;
    /sys/class/net would show the namespace sysfs was mounted in, not this one)."""
    r = subprocess.run(["ip", "link", "show", "dev", "migbr0"], capture_output=True)
    return r.returncode == 0


def config_with(lab: labmod.Lab, path: Path, **hosts: dict[str, Any]) -> Path:
    """A copy of the lab's config with some host keys changed, e.g. host_b={"criu": "/x"}."""
    config = yaml.safe_load(lab.config_path.read_text())
    for name, changes in hosts.items():
        config["hosts"][name.replace("_", "-")].update(changes)  # host_b or host-b
    path.write_text(yaml.safe_dump(config))
    return path


# A two-process tree; each keeps a count in memory and writes it out every tick.
COUNTER = r"""
echo $$ > "$1.pid"
( m=0; while :; do m=$((m+1)); echo $m > "$1.child"; sleep 0.05; done ) &
n=0
while :; do n=$((n+1)); echo $n > "$1"; sleep 0.05; done
"""


@dataclass
class Workload:
    name: str
    count_file: Path
    spec: str  # what `migrate run` is given
    root_pid: int  # on the source host

    def count(self) -> int:
        """The last count written (0 if none yet); a read can catch the file mid-rewrite."""
        for _ in range(50):
            text = self.count_file.read_text().strip() if self.count_file.exists() else ""
            if text.isdigit():
                return int(text)
            time.sleep(0.01)
        return 0


def start(lab: labmod.Lab, host: str, name: str, container: bool) -> Workload:
    """Start the counter on host: a plain tree, or init of its own pid namespace."""
    work = lab.dir / "workloads"
    work.mkdir(exist_ok=True)
    script = work / "counter.sh"
    script.write_text(COUNTER)
    count = work / name
    for f in (count, Path(f"{count}.pid"), Path(f"{count}.child")):
        f.unlink(missing_ok=True)
    if container:
        inner = (
            'umount -l /run/netns 2>/dev/null; exec setsid sh "$1" "$2" </dev/null >/dev/null 2>&1'
        )
        launch = (
            'unshare --pid --fork --mount-proc --ipc --uts sh -c "$1" init "$2" "$3" '
            "</dev/null >/dev/null 2>&1 & echo $!"
        )
        unshare_pid = on(lab, host, launch, inner, str(script), str(count)).strip()
        pid = int(
            wait_for(
                lambda: on(lab, host, 'pgrep -P "$1"', unshare_pid, check=False).strip(),
                what="container init",
            )
        )
        spec = f"pid:{pid}"
    else:
        on(lab, host, 'setsid sh "$1" "$2" </dev/null >/dev/null 2>&1 &', str(script), str(count))
        pidfile = Path(f"{count}.pid")
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
        pid = int(pidfile.read_text())
        spec = f"pidfile:{pidfile}"
    wl = Workload(name, count, spec, pid)
    wait_for(lambda: wl.count() >= 20, what="the counter to reach 20")
    return wl


def running_pids(lab: labmod.Lab, host: str, count_file: Path) -> list[int]:
    """Pids on host (as it sees them) running the counter on count_file, not stopped."""
    out = on(lab, host, "ps -ww -e -o pid=,stat=,args=")
    return [
        int(line.split()[0])
        for line in out.splitlines()
        if str(count_file) in line and line.split()[1][0] not in "TZ"
    ]


def counter_pids(lab: labmod.Lab, host: str, count_file: Path) -> list[int]:
    """Every pid on host running the counter on count_file, stopped or not."""
    out = on(lab, host, "ps -ww -e -o pid=,args=")
    return [int(ln.split()[0]) for ln in out.splitlines() if str(count_file) in ln]


def netns_of(lab: labmod.Lab, host: str, pid: int) -> str:
    return on(lab, host, 'readlink "/proc/$1/ns/net"', str(pid)).strip()


NETAPPS = Path(__file__).parent / "netapps"
PYTHON = "/usr/bin/python3"  # Debian's: the same on every host of the lab

# Run inside a lab host: a container (pid, mount, net, ipc, uts namespaces) whose eth0 is a veth
# into the host's br0, with a pinned MAC and an address; prints the container init's pid.
# Once up, it announces itself (unsolicited ARP): an earlier test may have left its MAC elsewhere.
_NET_CONTAINER = r"""
addr=$1 mac=$2 veth=$3; shift 3
# A namespace killed just before goes away asynchronously, and its veth with it.
for _ in $(seq 250); do ip link show "$veth" >/dev/null 2>&1 || break; sleep 0.02; done
inner='umount -l /run/netns 2>/dev/null
while ! ip link show eth0 >/dev/null 2>&1; do sleep 0.02; done
ip link set lo up; ip addr add "$0" dev eth0; ip link set eth0 up
exec setsid "$@" </dev/null >/dev/null 2>&1'
unshare --pid --fork --mount-proc --net --ipc --uts sh -c "$inner" "$addr" "$@" \
  </dev/null >/dev/null 2>&1 &
up=$!
for _ in $(seq 250); do init=$(pgrep -P $up) && break; sleep 0.02; done
ip link add "$veth" type veth peer name eth0 address "$mac" netns "$init"
ip link set "$veth" master br0 up
for _ in $(seq 250); do
  nsenter -t "$init" -n ip -4 addr show eth0 | grep -q inet && break; sleep 0.02
done
nsenter -t "$init" -n arping -q -U -c 1 -I eth0 "${addr%/*}" </dev/null >/dev/null 2>&1 &
echo "$init"
"""


def start_net_container(
    lab: labmod.Lab, host: str, address: str, mac: str, veth: str, *argv: str
) -> int:
    """A container with its own network on host; its init's pid as host sees it."""
    return int(on(lab, host, _NET_CONTAINER, address, mac, veth, *argv).strip())


@dataclass
class NetClient:
    """A client from tests/netapps in the lab's client namespace, until stop() is called."""

    proc: subprocess.Popen[str]
    stop_file: Path

    def stop(self) -> dict[str, Any]:
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=60)
        assert out.strip(), f"echo client printed nothing: {err}"
        result: dict[str, Any] = json.loads(out)
        return result


def net_client(lab: labmod.Lab, app: str, address: str, port: int, tmp: Path) -> NetClient:
    """Start tests/netapps/APP.py ADDRESS PORT STOPFILE in the client namespace."""
    stop = tmp / f"stop-{app}-{address}-{port}"
    stop.unlink(missing_ok=True)
    argv = [PYTHON, str(NETAPPS / f"{app}.py"), address, str(port), str(stop)]
    proc = subprocess.Popen(
        labmod.exec_argv(lab, labmod.CLIENT, argv), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return NetClient(proc, stop)
