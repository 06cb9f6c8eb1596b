"""Issue #14: no unprivileged local user can read or write a workload's pages, on either host,
during stream and post-copy migrations (hybrid: tests/vm), and tampered images are refused.

An attacker (tests/netapps/pagethief.py) runs as `nobody` inside each lab host's namespaces
for the whole migration: it connects to every TCP port and Unix socket that starts listening,
binds every TCP port that is freed, and reads every file under both hosts' workdirs. The
workload (tests/netapps/memwriter.py) holds a secret marker in its memory.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator import lab as labmod
from tests.labkit import NETAPPS, PYTHON, counter_pids, migrate, on, wait_for

pytestmark = pytest.mark.lab

SIZE_MIB = 64
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
JUNK = b"OVERWRITTEN-BY-NOBODY-"
CRIU_PARASITE = "@/crtools-pr-"

# Whether a process's memory holds a marker (read from /proc/PID/mem on its host).
_MEM_HOLDS = r"""
import re, sys
pid, marker = sys.argv[1], sys.argv[2].encode()
with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
    for line in maps:
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
        if not m or "[vvar]" in line or "[vsyscall]" in line:
            continue
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        try:
            mem.seek(start)
            if marker in mem.read(end - start):
                print("yes")
                break
        except OSError:
            pass
"""

# A root-owned listener on the host's loopback that gives its bytes to whoever connects
# first, then exits (freeing its port): the attacker must catch it, then bind its port (a
# control). SO_REUSEADDR: it closes first, and without it on both sides its connection's
# TIME_WAIT keeps the port from the attacker (EADDRINUSE; failed CI once).
_CONTROL = (
    "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', 0)); s.listen(1); "
    "c, _ = s.accept(); c.sendall(b'CONTROL' + b'LEAK'); c.close(); s.close()"
)


@dataclass
class Writer:
    pid: int
    log: Path

    def ticks(self) -> list[int]:
        text = self.log.read_text() if self.log.exists() else ""
        assert "CORRUPT" not in text, text[-500:]  # memory came back wrong
        return [int(ln.split()[0]) for ln in text.splitlines() if ln.split()[0].isdigit()]


def start_writer(
    lab: labmod.Lab, name: str, secret: str, mib: int = SIZE_MIB, wait: float = 60
) -> Writer:
    log = lab.dir / "workloads" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    argv = [PYTHON, str(NETAPPS / "memwriter.py"), str(log), str(mib), secret]
    pid = on(lab, "host-a", 'setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', *argv).strip()
    w = Writer(int(pid), log)
    wait_for(lambda: len(w.ticks()) >= 50, timeout=wait, what="the writer to fill its memory")
    return w


def kill_writer(lab: labmod.Lab, w: Writer) -> None:
    for host in ("host-a", "host-b"):
        pids = counter_pids(lab, host, w.log)
        if pids:
            on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)


@contextlib.contextmanager
def make_arena() -> Iterator[Path]:
    """A directory nobody can write to, with the attacker's script."""
    base = Path(tempfile.mkdtemp(prefix="pagethief-", dir="/tmp"))
    base.chmod(0o777)
    shutil.copy(NETAPPS / "pagethief.py", base / "pagethief.py")
    (base / "pagethief.py").chmod(0o644)
    try:
        yield base
    finally:
        (base / "stop").touch()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def arena() -> Iterator[Path]:
    with make_arena() as base:
        yield base


class Thieves:
    """One attacker per host, as nobody, in that host's namespaces."""

    def __init__(self, lab: labmod.Lab, base: Path, hosts: tuple[str, ...]) -> None:
        self.base, self.hosts = base, hosts
        dirs = [str(lab.host(h).workdir) for h in lab.names]
        for host in hosts:
            out = base / host
            on(lab, host, 'setsid "$@" </dev/null >/dev/null 2>&1 &', *NOBODY, PYTHON,
               str(base / "pagethief.py"), str(out), str(base / "stop"), *dirs)  # fmt: skip
            wait_for(lambda o=out: Path(f"{o}.ready").exists(), what=f"the attacker on {host}")

    def stop(self) -> dict[str, tuple[dict[str, Any], bytes]]:
        (self.base / "stop").touch()
        got = {}
        for host in self.hosts:
            out = self.base / host
            wait_for(lambda o=out: Path(f"{o}.json").exists(), timeout=60,
                     what=f"the attacker on {host} to report")  # fmt: skip
            got[host] = (json.loads(Path(f"{out}.json").read_text()),
                         Path(f"{out}.bin").read_bytes())  # fmt: skip
        return got


@pytest.mark.parametrize("strategy", ["stream", "postcopy"])
def test_nobody_gets_or_changes_no_page(
    lab: labmod.Lab, arena: Path, strategy: str, record_property: Any
) -> None:
    record_property("measured", f"{strategy}: " + thieves_during(lab, arena, strategy))


def thieves_during(
    lab: labmod.Lab, arena: Path, strategy: str, *options: str, slow: float = 1.0,
    mib: int = SIZE_MIB,
) -> str:  # fmt: skip
    """Move a writer host-a -> host-b with an attacker on each host; check what they got and
    that nothing changed; what they tried (for `measured`). tests/vm runs it for hybrid."""
    secret = "SECRET-" + secrets.token_hex(8)
    w = start_writer(lab, f"thief-{strategy}", secret, mib=mib, wait=60 * slow)
    try:
        thieves = Thieves(lab, arena, ("host-a", "host-b"))
        controls = {
            h: on(lab, h, 'setsid "$1" -c "$2" </dev/null >/dev/null 2>&1 & echo $!', PYTHON,
                  _CONTROL).strip()
            for h in thieves.hosts
        }  # fmt: skip
        # --keep-images: the attacker also tries the images at rest, after the migration.
        r = migrate("run", f"pid:{w.pid}", "host-a", "host-b", "--strategy", strategy,
                    "--json", "--keep-images", *options, config=lab.config_path,
                    timeout=300 * slow)  # fmt: skip
        got = thieves.stop()
        report = json.loads(r.stdout) if r.stdout.strip() else {}
        assert r.returncode == 0, r.stdout + r.stderr
        assert report["status"] == "succeeded", report
        restored = str(report["restored_pid"])
        held = on(lab, "host-b", '"$1" -c "$2" "$3" "$4"', PYTHON, _MEM_HOLDS, restored, secret)
        junk = on(lab, "host-b", '"$1" -c "$2" "$3" "$4"', PYTHON, _MEM_HOLDS, restored,
                  JUNK.decode())  # fmt: skip
        before = len(w.ticks())
        wait_for(lambda: len(w.ticks()) > before + 50, timeout=10 * slow,
                 what="the writer to tick on on host-b")  # fmt: skip
        ticks = w.ticks()
    finally:
        kill_writer(lab, w)
        for h, pid in locals().get("controls", {}).items():
            on(lab, h, f"kill -KILL {pid} 2>/dev/null", check=False)
    # The kept images go whatever fails below (a later test expects empty image dirs).
    kept = [lab.host(h).workdir / "images" / report["id"] for h in ("host-a", "host-b")]
    try:
        measured = []
        for host, (log, data) in got.items():
            # The attacker worked: it caught the control listener, and then bound its freed port.
            assert b"CONTROLLEAK" in data, (host, log)
            assert log["bound"], (host, log)
            assert log["iterations"] > 20, (host, log)
            # ... but got no byte of the workload's memory, and reached no page channel.
            assert secret.encode() not in data, (host, log)
            # CRIU's own parasite socket (compel's abstract `crtools-pr-*` SEQPACKET listener, in
            # the workload's network namespace, accepted without a credential check) is reachable
            # by any user sharing that namespace: a CRIU limitation, not ours (see the README).
            # It carries control messages, not pages: the checks above and below still hold.
            assert [p for p in log["unix_connected"] if not p.startswith(CRIU_PARASITE)] == []
            assert len(log["tcp_connected"]) == 1, (host, log)  # the control only
            assert not [f for f in log["files_read"] if "/images/" in f], (host, log)
            measured.append(
                f"{host}: {log['iterations']} polls, saw unix {log['unix_seen']} (connected: "
                f"{log['unix_connected']}), "
                f"tcp {log['tcp_listeners']} (connected: {log['tcp_connected']}), "
                f"files denied {len(log['files_denied'])}, "
                f"dirs denied {len(log['dirs_denied'])}"
            )
        # At rest: root-only files in root-only dirs, and the report says where they are.
        loose = [
            f"{p} {p.stat().st_mode & 0o777:o}"
            for d in kept
            for p in [d, *d.rglob("*")]
            if p.stat().st_mode & 0o077
        ]
    finally:
        for d in kept:
            shutil.rmtree(d, ignore_errors=True)
    assert loose == []
    assert any("hold the workload's memory" in n for n in report["notes"]), report["notes"]
    # Nothing was changed: the restored copy holds the original marker, no junk, and every
    # page it checks still holds what it wrote (memwriter says CORRUPT otherwise).
    assert held.strip() == "yes"
    assert junk.strip() != "yes"
    assert ticks == list(range(1, len(ticks) + 1))
    return "; ".join(measured)


def test_a_tampered_image_is_refused_and_rolled_back(lab: labmod.Lab, tmp_path: Path) -> None:
    """One byte of the pages file flipped on the destination while rsync writes it: the
    checksums recorded on the source refuse it before restore; the source runs on."""
    secret = "SECRET-" + secrets.token_hex(8)
    w = start_writer(lab, "tampered", secret, mib=32)
    images = lab.host("host-b").workdir / "images"
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", f"pid:{w.pid}", "host-a",
             "host-b", "--strategy", "stopcopy", "--bwlimit", "4096", "--json",
             "--config", str(lab.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

        def partial() -> Path | None:  # rsync's temporary file for the pages, well under way
            for p in images.glob("*/.pages-*.img.*"):
                if p.stat().st_size > 1 << 20:
                    return p
            return None

        path = wait_for(partial, timeout=60, what="rsync to be writing the pages on host-b")
        with open(path, "r+b") as f:
            f.seek(4096 + 17)
            byte = f.read(1)
            f.seek(4096 + 17)
            f.write(bytes([byte[0] ^ 0xFF]))
        out, err = run.communicate(timeout=120)
        report = json.loads(out)
        assert run.returncode == 3, out + err
        assert report["status"] == "rolled_back", report
        assert "are not what host-a dumped" in report["error"], report["error"]
        assert "pages-" in report["error"] and "content differs" in report["error"]
        # The source runs on, with its memory; nothing runs or is left on host-b.
        before = len(w.ticks())
        wait_for(lambda: len(w.ticks()) > before + 50, what="the writer to tick on on host-a")
        assert counter_pids(lab, "host-a", w.log) == [w.pid]
        assert counter_pids(lab, "host-b", w.log) == []
        assert not list(images.glob("*")), list(images.glob("*"))
        assert "restore" not in [p["name"] for p in report["phases"] if p["status"] == "ok"]
    finally:
        kill_writer(lab, w)


@pytest.mark.parametrize("phase", ["page-server", "dump"])
def test_stream_controller_killed_then_recover(
    lab: labmod.Lab, cleanup: list[Path], phase: str
) -> None:
    """A dead controller's stream run leaves a page channel helper waiting for its one
    connection: recover ends it (else it would wait on the image dir) and rolls back."""
    from tests.faults.conftest import Case
    from tests.faults.test_controller import killed_then_recovered

    killed_then_recovered(lab, cleanup, Case(), phase, "stream", "rolled_back")
    for host in ("host-a", "host-b"):
        assert "pages.sock" not in on(lab, host, "ps -ww -e -o args="), host
