"""The per-host agent (transport/agent_main.py), run for real on this machine through the
controller's own Agent class (its ssh channel replaced by the agent's pipes): commands without
a shell, timeouts that kill, private files, sockets handed to a command, the image pipe with
its checks, and the peers it refuses."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.transport.agent import ARGV, Agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (peers by uid)")


class PipeChannel:
    """What Agent needs of a paramiko channel, over a local process's pipes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.closed = False

    def sendall(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def makefile(self, mode: str) -> Any:
        return self.proc.stdout

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


@pytest.fixture
def agent() -> Iterator[Agent]:
    proc = subprocess.Popen(ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    a = Agent(PipeChannel(proc), "local")  # type: ignore[arg-type]
    try:
        yield a
    finally:
        a.close()
        if proc.poll() is None:
            proc.kill()


def test_runs_argv_without_a_shell(agent: Agent, tmp_path: Path) -> None:
    r = agent.call("run", 10, argv=["echo", "$HOME", "; rm -rf /"], timeout=5)
    assert r["rc"] == 0 and r["out"] == "$HOME ; rm -rf /\n"
    assert r["started"] <= r["ended"]
    r = agent.call("run", 10, argv=["sh", "-c", "echo oops >&2; exit 3"], timeout=5)
    assert (r["rc"], r["err"]) == (3, "oops\n")
    r = agent.call("run", 10, argv=["/nonexistent/program"], timeout=5)
    assert r["rc"] == 127 and "No such file" in r["err"]


def test_private_commands_write_root_only_files(agent: Agent, tmp_path: Path) -> None:
    agent.call("run", 10, argv=["touch", str(tmp_path / "p")], timeout=5, umask=0o077)
    agent.call("run", 10, argv=["touch", str(tmp_path / "o")], timeout=5, umask=0o022)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o644


def test_a_command_past_its_timeout_is_killed_with_its_group(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "late"
    # The child (and its own child) would write the marker after 3 s: both must be gone.
    script = f"(sleep 3; touch {marker}) & sleep 3; touch {marker}"
    t0 = time.monotonic()
    r = agent.call("run", 20, argv=["sh", "-c", script], timeout=0.5)
    assert r["timed_out"] and time.monotonic() - t0 < 3
    time.sleep(3.5)
    assert not marker.exists()


def test_requests_overlap(agent: Agent) -> None:
    slow: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: slow.update(agent.call("run", 20, argv=["sleep", "2"], timeout=10))
    )
    t.start()
    t0 = time.monotonic()
    fast = agent.call("ping", 5)
    assert time.monotonic() - t0 < 1 and "time" in fast
    t.join()
    assert slow["rc"] == 0


def test_read_without_a_process(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"\x00\x01pid 42\n")
    import base64

    assert base64.b64decode(agent.call("read", 5, path=str(tmp_path / "f"))["data"]) == (
        b"\x00\x01pid 42\n"
    )
    assert agent.call("read", 5, path=str(tmp_path / "missing")) == {"missing": True, "id": 2}


def _images(top: Path) -> None:
    top.mkdir(mode=0o700)
    (top / "pages-1.img").write_bytes(os.urandom(3 << 20))
    (top / "core-1.img").write_bytes(b"core")
    (top / "dump.log").write_text("a log is not an image\n")
    (top / "sub").mkdir()
    (top / "sub" / "export.tar").write_bytes(b"tar" * 1000)
    (top / "parent").symlink_to("../1")


def test_the_image_pipe_moves_a_dir_and_checks_it(agent: Agent, tmp_path: Path) -> None:
    src, dst, sock = tmp_path / "src", tmp_path / "dst", tmp_path / "in.sock"
    _images(src)
    assert agent.call("listen", 5, sock=str(sock), dir=str(dst), wait=30) == {
        "listening": True, "id": 1,
    }  # fmt: skip
    assert sock.stat().st_mode & 0o777 == 0o600
    sent = agent.call("send", 30, sock=str(sock), dir=str(src))
    got = agent.call("collect", 30, sock=str(sock), timeout=30)
    assert "error" not in sent and "error" not in got, (sent, got)
    assert sent["files"] == got["files"] and set(got["files"]) == {
        "pages-1.img", "core-1.img", "sub/export.tar",
    }  # fmt: skip
    assert (dst / "pages-1.img").read_bytes() == (src / "pages-1.img").read_bytes()
    assert os.readlink(dst / "parent") == "../1" and not (dst / "dump.log").exists()
    assert (dst / "pages-1.img").stat().st_mode & 0o777 == 0o600
    assert not sock.exists()  # one connection, then the socket is gone


def test_a_byte_changed_on_the_destination_is_seen(agent: Agent, tmp_path: Path) -> None:
    src, dst, sock = tmp_path / "src", tmp_path / "dst", tmp_path / "in.sock"
    _images(src)
    agent.call("listen", 5, sock=str(sock), dir=str(dst), wait=30)
    sending = threading.Thread(
        target=agent.call,
        args=("send", 60),
        kwargs={"sock": str(sock), "dir": str(src), "bwlimit": 512},  # fmt: skip
    )
    sending.start()
    part = dst / ".pages-1.img.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 8192):  # written, at 512 KiB/s
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with open(part, "r+b") as f:
        f.seek(17)
        byte = f.read(1)
        f.seek(17)
        f.write(bytes([byte[0] ^ 0xFF]))
    sending.join()
    got = agent.call("collect", 30, sock=str(sock), timeout=30)
    want = (src / "pages-1.img").read_bytes()
    import zlib

    assert got["files"]["pages-1.img"] != [zlib.crc32(want), len(want)]
    assert got["files"]["core-1.img"] == [zlib.crc32(b"core"), 4]


def test_the_pipe_refuses_other_users_and_paths_outside(agent: Agent, tmp_path: Path) -> None:
    dst, sock = tmp_path / "dst", tmp_path / "in.sock"
    tmp_path.chmod(0o755)
    agent.call("listen", 5, sock=str(sock), dir=str(dst), wait=30)
    # nobody cannot even reach the socket (0600), and a peer that is not root is dropped
    thief = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "python3", "-c",
         "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])", str(sock)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert thief.returncode != 0 and "Permission denied" in thief.stderr
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b'{"path": "../escaped", "kind": "file", "size": 1}\nx{"crc": 0}\n')
        s.shutdown(socket.SHUT_WR)
        s.recv(16)
    got = agent.call("collect", 30, sock=str(sock), timeout=30)
    assert "refused path '../escaped'" in got["error"]
    assert not (tmp_path / "escaped").exists()


def test_a_socket_is_handed_to_the_command(agent: Agent, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    script = (
        "import os,sys; fd=int(sys.argv[1]); assert os.get_blocking(fd); "
        "os.write(fd, b'hello from fd')"
    )
    r = agent.call("run", 10, argv=["python3", "-c", script, "@tok"], timeout=5,
                   sockets={"@tok": str(path)})  # fmt: skip
    assert r["rc"] == 0, r
    conn, _ = server.accept()
    assert conn.recv(64) == b"hello from fd"
    conn.close()
    server.close()


def test_the_pipe_connects_before_the_send_and_a_cancel_drops_it(
    agent: Agent, tmp_path: Path
) -> None:
    src, dst, sock = tmp_path / "src", tmp_path / "dst", tmp_path / "in.sock"
    _images(src)
    agent.call("listen", 5, sock=str(sock), dir=str(dst), wait=30)
    assert agent.call("connect", 5, sock=str(sock))["connected"] is True
    # taken before the freeze: once the receiver has accepted it, the listener is gone
    deadline = time.monotonic() + 10
    while sock.exists():
        assert time.monotonic() < deadline, "the receiver did not take the connection"
        time.sleep(0.01)
    sent = agent.call("send", 30, sock=str(sock), dir=str(src))
    got = agent.call("collect", 30, sock=str(sock), timeout=30)
    assert "error" not in sent and sent["files"] == got["files"], (sent, got)
    # a second pipe, connected and then cancelled: the receiver ends instead of waiting on
    other = tmp_path / "in2.sock"
    agent.call("listen", 5, sock=str(other), dir=str(tmp_path / "dst2"), wait=30)
    agent.call("connect", 5, sock=str(other))
    t0 = time.monotonic()
    assert agent.call("cancel", 5, sock=str(other))["cancelled"] is True
    assert agent.call("collect", 30, sock=str(other), timeout=30)["error"].startswith(
        "nothing listens"
    )
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "dst2" / "pages-1.img").exists()


# Stands in for CRIU's --status-fd N: says ready on fd N, lingers, exits 3 (stderr kept).
# (the ppid file is written before the status byte: once "ready" is answered it is there)
_STATUS = (
    "import os,sys,time; sys.stderr.write('to the err file\\n'); sys.stderr.flush(); "
    "f = open(sys.argv[1], 'w'); f.write(str(os.getppid())); f.close(); "
    "os.write(int(sys.argv[-1]), b'\\0'); os.close(int(sys.argv[-1])); "
    "time.sleep(float(sys.argv[2])); sys.exit(3)"
)


def _parent_comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_a_detached_command_says_ready_runs_on_and_leaves_its_exit_code(tmp_path: Path) -> None:
    proc = subprocess.Popen(ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    agent = Agent(PipeChannel(proc), "local")  # type: ignore[arg-type]
    ppid = tmp_path / "ppid"
    try:
        r = agent.call("run", 20, argv=["python3", "-c", _STATUS, str(ppid), "1", "--x"],
                       timeout=10, detach=[str(tmp_path), "job"])  # fmt: skip
        assert (r["rc"], r["out"]) == (0, "ready\n"), r
        # its parent is the agent's forked copy (python3), not a shell, and it outlives the agent
        assert _parent_comm(int(ppid.read_text())).startswith("python")
        assert not (tmp_path / "job.rc").exists()
    finally:
        agent.close()
    deadline = time.monotonic() + 30
    while not (tmp_path / "job.rc").exists():
        assert time.monotonic() < deadline, "no exit code recorded after the agent ended"
        time.sleep(0.05)
    assert (tmp_path / "job.rc").read_text() == "3\n"
    assert (tmp_path / "job.err").read_text() == "to the err file\n"
    assert (tmp_path / "job.err").stat().st_mode & 0o777 == 0o600


def test_a_detached_command_that_ends_before_ready_says_its_exit_code(
    agent: Agent, tmp_path: Path
) -> None:
    r = agent.call("run", 20, argv=["sh", "-c", "echo bad >&2; exit 7", "sh"], timeout=10,
                   detach=[str(tmp_path), "job"])  # fmt: skip
    assert r["out"] == "exited 7\n", r
    assert (tmp_path / "job.err").read_text() == "bad\n"
    r = agent.call("run", 20, argv=["/nonexistent/criu"], timeout=10,
                   detach=[str(tmp_path), "gone"])  # fmt: skip
    assert r["out"] == "exited 127\n", r


def test_a_lock_is_held_until_unlocked_or_the_agent_ends(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "locks" / "pid-1.lock"
    assert agent.call("lock", 5, path=str(path), holder="migration A")["locked"] is True
    assert (path.parent.stat().st_mode & 0o777, path.read_text()) == (0o700, "migration A\n")
    # another take (another migration through this agent, or another process) is refused
    busy = agent.call("lock", 5, path=str(path), holder="migration B")
    assert (busy["busy"], busy["holder"]) == (True, "migration A")
    probe = ["flock", "-n", str(path), "true"]
    assert subprocess.run(probe, check=False).returncode == 1
    assert agent.call("unlock", 5, path=str(path))["unlocked"] is True
    assert subprocess.run(probe, check=False).returncode == 0
    # held again, then the agent ends (its controller's connection closed): free at once
    agent.call("lock", 5, path=str(path), holder="migration C")
    agent.close()
    assert subprocess.run(probe, check=False).returncode == 0


def test_stop_tree_stops_the_root_and_every_descendant(agent: Agent) -> None:
    """Post-copy's hold on the source: a SIGSTOP to a tree (a child of a child included), sent
    by the agent itself; nothing else is touched."""
    tree = subprocess.Popen(
        ["sh", "-c", "sh -c 'sleep 60 & wait' & sleep 60 & wait"], start_new_session=True
    )  # its own group: pgrep -g finds the tree
    other = subprocess.Popen(["sleep", "60"])
    try:

        def pids() -> list[int]:
            out = subprocess.run(["pgrep", "-g", str(tree.pid)], capture_output=True, text=True)
            return sorted(int(p) for p in out.stdout.split())

        wait = time.monotonic() + 10
        while len(pids()) < 4:  # sh, sh, sleep, sleep
            assert time.monotonic() < wait, pids()
            time.sleep(0.05)
        stopped = agent.call("stop_tree", 5, root=tree.pid)["stopped"]
        assert sorted(stopped) == pids()

        def state(pid: int) -> str:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

        wait = time.monotonic() + 10
        while any(state(p) != "T" for p in stopped):
            assert time.monotonic() < wait, {p: state(p) for p in stopped}
            time.sleep(0.05)
        assert state(other.pid) != "T"
    finally:
        for p in [tree.pid, *subprocess.run(["pgrep", "-g", str(tree.pid)], capture_output=True,
                                             text=True).stdout.split()]:  # fmt: skip
            try:
                os.kill(int(p), signal.SIGKILL)
            except OSError:
                pass
        other.kill()
        tree.wait()
        other.wait()
