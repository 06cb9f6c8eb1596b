"""A stock LXC container (lxc-create's busybox template over the distribution's common.conf:
ttys under /dev/lxc, a console, a getty on tty1, read-only bind mounts of the host's
libraries, a veth with an address) moves a->b->a->b: its memory, its address, its console and
ttys (the getty keeps its tty; the mounts and the fds are the same pty), and a client with a
cached ARP entry reaches it within a second of each move (see `reaches`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.containerkit import STOCK_ADDRESS, Container, workload_config
from tests.labkit import failing_restore_config, migrate, on, wait_for

pytestmark = pytest.mark.lab

# Inside the container (by its init's pid): "PID FD DEV RDEV" of the getty's and the console
# shell's stdin, then "/dev/lxc/tty1 DEV RDEV" and "/dev/console DEV RDEV" of the mounts.
_TTYS = r"""
root=/proc/$1/root
for p in $(ls /proc | grep '^[0-9]'); do
  [ "$(readlink /proc/$p/ns/pid)" = "$(readlink /proc/$1/ns/pid)" ] || continue
  case "$(tr '\0' ' ' < /proc/$p/cmdline)" in
    *getty*) echo "getty $(stat -L -c '%d %t:%T' /proc/$p/fd/0)";;
  esac
done
echo "tty1 $(stat -L -c '%d %t:%T' $root/dev/lxc/tty1)"
echo "console $(stat -L -c '%d %t:%T' $root/dev/console)"
"""


def ttys(lab: labmod.Lab, host: str, ctr: Container) -> dict[str, str]:
    out = on(lab, host, _TTYS, str(ctr.pid(host)))
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


# Up to 3 ICMP echoes to argv[1], a second apart; exit 0 at the first reply (no ping(8) in the lab).
_PING = r"""
import os, select, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
body = struct.pack("!HH", os.getpid() & 0xFFFF, 1) + b"migrate!"
msg = struct.pack("!BBH", 8, 0, 0) + body
c = sum(struct.unpack("!%dH" % (len(msg) // 2), msg + b"\0" * (len(msg) % 2)))
c = (c >> 16) + (c & 0xFFFF)
msg = struct.pack("!BBH", 8, 0, ~(c + (c >> 16)) & 0xFFFF) + body
for _ in range(3):
    s.sendto(msg, (sys.argv[1], 0))
    while select.select([s], [], [], 1.0)[0]:
        data, (addr, _) = s.recvfrom(1024)
        if addr == sys.argv[1] and data[20] == 0 and data[24:] == body:
            sys.exit(0)
sys.exit(1)
"""


def reaches(lab: labmod.Lab) -> bool:
    """An ICMP echo from the client namespace (its ARP entry cached) answered within a second,
    asked up to 3 times. The bridges learn the container's new place from the first frame its
    interface sends on the new host (the restore's unsolicited ARP, sent in the background
    right after it, or the kernel's own IPv6 neighbour discovery as the restored link comes
    up), within milliseconds; an echo sent before that is lost (seen in ~1 run in 5 of this
    module when one echo was all it had), the next one gets through."""
    out = on(lab, labmod.CLIENT, 'python3 -c "$1" "$2" && echo ok', _PING, STOCK_ADDRESS,
             check=False)  # fmt: skip
    return out.strip() == "ok"


@pytest.mark.parametrize("stock_lxc", ["template", "common"], indirect=True)
def test_stock_lxc_container_moves_there_and_back(
    lab: labmod.Lab, stock_lxc: Container, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    ctr = stock_lxc
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr)
    wait_for(lambda: reaches(lab), timeout=10, what="the client to reach the container")
    first = ttys(lab, "host-a", ctr)
    assert first["tty1"] == first["getty"] and "console" in first, first
    freezes = []
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a"), ("host-a", "host-b")):
        before = ctr.count(src)
        r = migrate("run", ctr.name, src, dst, "--json", config=cfg)
        report = json.loads(r.stdout)
        assert report["status"] == "succeeded", r.stdout + r.stderr
        # A client whose ARP entry points at the address reaches it at once, on dst.
        assert reaches(lab), f"no reply from {STOCK_ADDRESS} right after {src} -> {dst}"
        assert ctr.pid(dst) == report["restored_pid"] and not ctr.exists(src)
        now = ctr.count(dst)
        assert now >= before
        wait_for(lambda h=dst, n=now: ctr.count(h) > n + 5, what=f"the counter to go on on {dst}")
        # The getty kept its tty: the one mounted at /dev/lxc/tty1 (a live pty, not a deleted
        # one), and the console is there.
        seen = ttys(lab, dst, ctr)
        assert seen["tty1"] == seen["getty"] and "console" in seen, seen
        freezes.append(report["downtime_ms"])
    record_property("measured", f"stock lxc ({ctr.name}): freezes {freezes} ms")


@pytest.mark.parametrize("stock_lxc", ["template"], indirect=True)
def test_failed_stock_lxc_restore_names_the_cause_and_keeps_the_source(
    lab: labmod.Lab, stock_lxc: Container, tmp_path: Path
) -> None:
    """host-b's criu refuses the restore (as a real CRIU error, printed through LXC's stderr):
    the report's error is that line, not LXC's summaries; the container runs on host-a, with
    its ttys, and nothing of it is on host-b."""
    ctr = stock_lxc
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr,
                          base=failing_restore_config(lab, tmp_path))  # fmt: skip
    before = ctr.count("host-a")
    r = migrate("run", ctr.name, "host-a", "host-b", "--json", config=cfg)
    report = json.loads(r.stdout)
    assert report["status"] == "rolled_back", r.stdout + r.stderr
    assert report["error"].endswith(
        "Error (criu/cr-restore.c:1): restore refused (injected by the test)"
    ), report["error"]
    assert ctr.pid("host-a") and ctr.count("host-a") >= before
    seen = ttys(lab, "host-a", ctr)
    assert seen["tty1"] == seen["getty"], seen
    assert ctr.pid("host-b") == 0 and not ctr.exists("host-b")
    assert not on(lab, "host-b", "pgrep -x getty || true").strip()
