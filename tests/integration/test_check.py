"""Will it move? Each workload CRIU would refuse only after the freeze is refused by `migrate
check WORKLOAD SRC DST` and by `run`'s pre-flight (exit 2), nothing frozen: built for real on
the lab's host-a, checked against host-b. Real lab, real CRIU, the real CLI."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from orchestrator.workloadcheck import CAP_SYS_RESOURCE
from tests.labkit import (
    NETAPPS,
    PYTHON,
    config_with,
    failing_restore_config,
    migrate,
    on,
    wait_for,
)

pytestmark = pytest.mark.lab

LOOP = "while :; do sleep 1; done"

# A container (pid + mount namespaces) as labkit starts one, but with what the case needs:
# $1 the unshare options, $2 the inner script; prints the container init's pid.
_CONTAINER = r"""
unshare $1 --pid --fork --mount-proc sh -c "$2" wl-init </dev/null >/dev/null 2>&1 &
up=$!
for _ in $(seq 250); do init=$(pgrep -P $up) && break; sleep 0.02; done
echo "$init"
"""


@pytest.fixture
def started(lab: labmod.Lab) -> Iterator[list[int]]:
    """Root pids on host-a: each tree is killed at the end, by pid."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        on(lab, "host-a", 'pkill -KILL -P "$1"; kill -KILL "$1"', str(pid), check=False)


def plain(lab: labmod.Lab, script: str, marker: str, session: bool = True) -> int:
    """A plain tree on host-a: `sh -c SCRIPT MARKER`, in a session of its own (else in the
    session of the shell that starts it, whose leader is outside host-a's pid namespace);
    its root pid."""
    launch = 'sh -c "$1" "$2" </dev/null >/dev/null 2>&1 &'
    on(lab, "host-a", f"setsid {launch}" if session else launch, script, marker)

    def root() -> int:
        for line in on(lab, "host-a", "ps -ww -e -o pid=,args=").splitlines():
            pid, _, args = line.strip().partition(" ")
            if args == f"sh -c {script} {marker}":
                return int(pid)
        return 0

    return int(wait_for(root, what=marker))


def container(lab: labmod.Lab, options: str, inner: str) -> int:
    pid = int(on(lab, "host-a", _CONTAINER, options, inner).strip())
    wait_for(lambda: on(lab, "host-a", 'pgrep -P "$1"', str(pid), check=False), what="its child")
    return pid


def other_user(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    caps = on(lab, "host-a", "sed -n 's/^CapEff:[[:space:]]*//p' /proc/$$/status")
    if int(caps, 16) & (1 << CAP_SYS_RESOURCE):
        pytest.skip("root on the lab hosts has CAP_SYS_RESOURCE: CRIU can dump other users")
    # root here lacks CAP_SYS_RESOURCE (this machine's bounding set); a child runs as nobody.
    child = f"setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '{LOOP}' & {LOOP}"
    return plain(lab, child, "wl-other-user"), "runs as another user (uid 65534)"


def stdio_outside(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    # stdio opened by the host, outside the container's mount namespace
    inner = f"umount -l /run/netns 2>/dev/null; exec setsid sh -c '{LOOP}'"
    return container(lab, "", inner), "fd 0 (/dev/null) opened outside its own mount namespace"


def nsfs_mounts(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    # no `umount -l /run/netns` inside: the lab's namespace files stay mounted in it
    inner = f"exec setsid sh -c '{LOOP}' </dev/null >/dev/null 2>&1"
    return container(lab, "", inner), "namespace file mount(s)"


def userns_veth(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    inner = f"exec setsid sh -c '{LOOP}' </dev/null >/dev/null 2>&1"
    pid = container(lab, "--user --map-root-user --net", inner)
    on(lab, "host-a", 'ip link add wlck0 type veth peer name eth0 netns "$1" && '
       "ip link set wlck0 master br0 up", str(pid))  # fmt: skip
    return pid, "user namespace of its own with a veth (eth0)"


def tcp_outside(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    server = plain(lab, f'{PYTHON} "{NETAPPS}/echo_server.py" 7301', "wl-server")
    wait_for(lambda: "7301" in on(lab, "host-a", "ss -Hltn"), what="the echo server")
    connect = "import socket,time; s=socket.create_connection(('127.0.0.1',7301)); time.sleep(999)"
    pid = plain(lab, f'{PYTHON} -c "{connect}"; :', "wl-tcp")
    wait_for(lambda: "7301" in on(lab, "host-a", "ss -Htn state established"), what="connected")
    _extra.append(server)
    return pid, "-> 127.0.0.1:7301 cannot follow"


def listener_address(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    # a server bound to host-a's own address, which host-b does not have
    serve = (
        "import socket,time; s=socket.socket(); s.bind(('198.18.0.1',7303)); s.listen(); "
        "time.sleep(999)"
    )
    pid = plain(lab, f'{PYTHON} -c "{serve}"; :', "wl-listen")
    wait_for(lambda: "198.18.0.1:7303" in on(lab, "host-a", "ss -Hltn"), what="listening")
    return pid, "listens on 198.18.0.1:7303, an address the destination does not have"


_extra: list[int] = []

# A criu on host-a whose `cpuinfo dump` claims CPU features host-b's CPU lacks: the image's
# capability words that are 0 get bits set (same length: the protobuf stays valid).
DOCTOR_CRIU = r"""#!/bin/sh
criu "$@" || exit $?
[ "$1 $2" = "cpuinfo dump" ] || exit 0
exec python3 - "$4/cpuinfo.img" <<'EOF'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
i = 12; assert b[i] == 0x0A; end = i + 2 + b[i + 1]; j = i + 2
def varint(k):
    v = s = 0
    while True:
        c = b[k]; v |= (c & 0x7F) << s; s += 7; k += 1
        if c < 0x80: return v, k
while j < end:
    tag, k = varint(j)
    if tag & 7 == 0:
        v, k2 = varint(k)
        if tag >> 3 == 6 and v == 0: b[k] = 0x7F
        j = k2
    else:
        n, k2 = varint(k); j = k2 + n
open(p, "wb").write(b)
EOF
"""


def session_outside(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    # started with `&` from a shell outside host-a's pid namespace, without setsid
    return plain(lab, LOOP, "wl-session", session=False), "session leader is outside"


def cpu_mismatch(lab: labmod.Lab, tmp: Path) -> tuple[int, str]:
    return plain(lab, LOOP, "wl-cpu"), "criu cpuinfo check"


def doctored(lab: labmod.Lab, tmp: Path) -> Path:
    criu = tmp / "criu-doctors-cpuinfo"
    criu.write_text(DOCTOR_CRIU)
    criu.chmod(0o755)
    return config_with(lab, tmp / "doctored.yaml", host_a={"criu": str(criu)})


Case = Callable[[labmod.Lab, Path], tuple[int, str]]
CASES: dict[str, Case] = {
    "other-user": other_user, "stdio-outside": stdio_outside, "nsfs-mounts": nsfs_mounts,
    "userns-veth": userns_veth, "tcp-outside": tcp_outside, "cpu-mismatch": cpu_mismatch,
    "listener-address": listener_address, "session-outside": session_outside,
}  # fmt: skip


def untouched(lab: labmod.Lab, pid: int) -> None:
    stat = on(lab, "host-a", 'ps -o stat= -p "$1"', str(pid)).strip()
    assert stat and stat[0] not in "TtZ", stat


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_the_freeze(
    lab: labmod.Lab, started: list[int], tmp_path: Path, case: str
) -> None:
    _extra.clear()
    pid, why = CASES[case](lab, tmp_path)
    started.append(pid)
    started.extend(_extra)
    config = doctored(lab, tmp_path) if case == "cpu-mismatch" else lab.config_path
    spec = f"pid:{pid}"
    r = migrate("check", spec, "host-a", "host-b", config=config, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "will NOT move" in r.stdout and why in r.stdout, r.stdout
    js = json.loads(migrate("check", spec, "host-a", "host-b", "--json", config=config).stdout)
    assert js["moves"] is False and any(why in line for line in js["refusals"])
    r = migrate("run", spec, "host-a", "host-b", "--json", config=config, timeout=120)
    report = json.loads(r.stdout)
    assert r.returncode == 2, r.stdout + r.stderr
    assert [p["name"] for p in report["phases"]] == ["preflight"]
    assert why in report["error"]
    untouched(lab, pid)
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob("*")), host.name


def test_policy_lets_them_through(lab: labmod.Lab, started: list[int], tmp_path: Path) -> None:
    """cpu_check off, tcp_outside close: the same workloads will move."""
    pid, _ = cpu_mismatch(lab, tmp_path)
    started.append(pid)
    r = migrate("check", f"pid:{pid}", "host-a", "host-b", "--cpu-check", "off",
                config=doctored(lab, tmp_path))  # fmt: skip
    assert r.returncode == 0 and "it will move" in r.stdout, r.stdout + r.stderr
    _extra.clear()
    pid, _ = tcp_outside(lab, tmp_path)
    started.extend([pid, *_extra])
    r = migrate("check", f"pid:{pid}", "host-a", "host-b", "--tcp-outside", "close",
                config=lab.config_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tcp: 127.0.0.1:" in r.stdout and "-> 127.0.0.1:7301" in r.stdout
    # It moves, its connection restored closed (CRIU --tcp-close), and back.
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a")):
        r = migrate("run", f"pid:{pid}", src, dst, "--tcp-outside", "close", "--json",
                    config=lab.config_path, timeout=120)  # fmt: skip
        report = json.loads(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        pid = report["restored_pid"]
        stat = on(lab, dst, 'ps -o stat= -p "$1"', str(pid)).strip()
        assert stat and stat[0] not in "TtZ", stat
        assert "create_connection" not in on(lab, src, "ps -ww -e -o args=")  # one copy
        assert "0xc114" not in on(lab, src, "iptables -w -S")  # CRIU's network lock is gone


def test_a_plain_workload_will_move(lab: labmod.Lab, started: list[int]) -> None:
    pid = plain(lab, LOOP, "wl-fine")
    started.append(pid)
    r = migrate("check", f"pid:{pid}", "host-a", "host-b", config=lab.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pid {pid}" in r.stdout and "it will move" in r.stdout
    untouched(lab, pid)
    # Bad input: a pid that is not there, an unknown host.
    r = migrate("check", "pid:999999", "host-a", "host-b", config=lab.config_path)
    assert r.returncode == 2 and "is not running" in r.stdout, r.stdout + r.stderr
    r = migrate("check", f"pid:{pid}", "host-a", "host-z", config=lab.config_path)
    assert r.returncode == 2 and "unknown host 'host-z'" in r.stderr


def test_connection_outside_rolls_back_open(
    lab: labmod.Lab, started: list[int], tmp_path: Path
) -> None:
    """With tcp_outside close, a failed restore rolls the tree back from its images with its
    connection as it was (not closed): the echoes go on."""
    server = plain(lab, f'{PYTHON} "{NETAPPS}/echo_server.py" 7302', "wl-server2")
    started.append(server)
    wait_for(lambda: "7302" in on(lab, "host-a", "ss -Hltn"), what="the echo server")
    count = lab.dir / "workloads" / "pinger.count"
    count.parent.mkdir(exist_ok=True)
    count.unlink(missing_ok=True)
    pid = plain(lab, f'{PYTHON} "{NETAPPS}/pinger.py" 127.0.0.1 7302 "{count}"', "wl-ping")
    started.append(pid)
    echoes = lambda: count.read_text().strip() if count.exists() else ""  # noqa: E731
    wait_for(lambda: echoes().isdigit() and int(echoes()) > 5, what="echoes")
    r = migrate("run", f"pid:{pid}", "host-a", "host-b", "--tcp-outside", "close", "--json",
                config=failing_restore_config(lab, tmp_path), timeout=120)  # fmt: skip
    report = json.loads(r.stdout)
    assert r.returncode == 3 and report["status"] == "rolled_back", r.stdout + r.stderr
    before = int(echoes())
    wait_for(lambda: echoes() == "broken" or int(echoes() or 0) > before + 10, what="echoes")
    assert echoes() != "broken"
    assert "0xc114" not in on(lab, "host-a", "iptables -w -S")
