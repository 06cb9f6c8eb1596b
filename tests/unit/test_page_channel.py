"""The page channel (#14): its command lines, and its helper run for real on this machine
(Unix sockets and fd hand-over; no CRIU: small programs stand in for it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.criu import pagechannel
from orchestrator.criu.pagechannel import PageChannel

PY = sys.executable


def test_paths_and_flags() -> None:
    ch = PageChannel.for_dirs("/w/images/ID/", "/v/images/ID", lazy=True)
    assert ch.src_sock == "/w/images/ID/pages.sock"
    assert ch.dst_sock == "/v/images/ID/pages.sock"
    assert ch.dst_hand == "/v/images/ID/pages-hand.sock"
    assert ch.forward_spec() == "/w/images/ID/pages.sock:/v/images/ID/pages.sock"
    assert pagechannel.dump_flags(ch) == ["--lazy-pages", "--ps-socket", "5"]
    assert pagechannel.dump_flags(PageChannel("/a", "/b")) == ["--page-server", "--ps-socket", "5"]
    assert ch.too_long() is None
    assert PageChannel("/" + "x" * 100, "/b").too_long() == "/" + "x" * 100 + "/pages.sock"


def test_criu_argv_has_no_port() -> None:
    ch = PageChannel.for_dirs("/s", "/d")
    serve = ch.serve_argv(pagechannel.page_server("criu", "/d"))
    assert serve[:4] == ["python3", "-I", "-S", "-c"]
    assert serve[5:9] == ["serve", "/d/pages.sock", "5", str(pagechannel.WAIT_S)]
    assert serve[9:] == ["--", "criu", "page-server", "-D", "/d", "--ps-socket", "5",
                         "-o", "page-server.log", "-v4"]  # fmt: skip
    lazy = ch.take_argv(pagechannel.lazy_pages("criu", "/d/final"))
    assert lazy[5:9] == ["take", "/d/pages-hand.sock", "5", "30"]
    assert "--port" not in serve + lazy and "--address" not in serve + lazy
    fwd = ch.forward_argv(["ssh", "-S", "ctl"], "198.18.0.2")
    assert fwd == ["ssh", "-S", "ctl", "-O", "forward", "-L", "/s/pages.sock:/d/pages.sock",
                   "198.18.0.2"]  # fmt: skip
    assert ch.forward_argv(["ssh"], "h", cancel=True)[2] == "cancel"


# --- the helper, for real -------------------------------------------------------------------

WRITE = "import os, sys; os.write(5, sys.argv[1].encode()); os.close(5)"
READ = (
    "import os, sys\n"
    "data = b''\n"
    "while chunk := os.read(5, 65536):\n"
    "    data += chunk\n"
    "open(sys.argv[1], 'wb').write(data)\n"
    "os.chmod(sys.argv[1], 0o644)\n"
)


def helper(argv: list[str]) -> subprocess.CompletedProcess[str]:
    assert argv[0] == "python3"
    return subprocess.run([PY, *argv[1:]], capture_output=True, text=True, timeout=30)


def wait_file(path: Path) -> bytes:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    time.sleep(0.1)
    return path.read_bytes()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in (src, dst):
        d.mkdir(mode=0o700)
    return src, dst


def test_serve_then_connect_hands_one_connection_to_each_program(
    dirs: tuple[Path, Path],
) -> None:
    src, dst = dirs
    ch = PageChannel.for_dirs(str(dst), str(dst))  # one host: no forward needed
    out = dst / "got"
    r = helper(ch.serve_argv([PY, "-c", READ, str(out)]))
    assert r.returncode == 0 and r.stdout.strip() == "listening", r.stderr
    mode = os.stat(ch.dst_sock).st_mode & 0o777
    assert mode == 0o600, oct(mode)
    assert helper(ch.connect_argv([PY, "-c", WRITE, "PAGES"])).returncode == 0
    assert wait_file(out) == b"PAGES"
    assert not os.path.exists(ch.dst_sock)  # removed at the one accept: nobody else gets in


def test_hold_then_take_and_abort(dirs: tuple[Path, Path]) -> None:
    _, dst = dirs
    ch = PageChannel.for_dirs(str(dst), str(dst), lazy=True)
    assert helper(ch.hold_argv()).returncode == 0
    out = dst / "dump-saw"
    # The "lazy dump" connects at once and reads what the destination sends it.
    dump = subprocess.Popen([PY, "-c", ch_connect_reader(ch, str(out))])
    try:
        assert helper(ch.abort_argv()).returncode == 0  # the undo path
        assert wait_file(out) == b"\0\0\0\0"
    finally:
        dump.wait(timeout=10)
    assert not os.path.exists(ch.dst_sock) and not os.path.exists(ch.dst_hand)

    assert helper(ch.hold_argv()).returncode == 0
    got = dst / "lazy-pages-got"
    assert helper(ch.connect_argv([PY, "-c", WRITE, "LAZY"])).returncode == 0
    taker = helper(ch.take_argv([PY, "-c", READ, str(got)]))
    assert taker.returncode == 0, taker.stderr
    assert got.read_bytes() == b"LAZY"


def ch_connect_reader(ch: PageChannel, out: str) -> str:
    """A program that connects to the channel like the dump does and keeps what it reads."""
    return (
        "import os, socket, sys\n"
        f"s = socket.socket(socket.AF_UNIX); s.connect({ch.src_sock!r})\n"
        "data = b''\n"
        "while chunk := s.recv(65536):\n"
        "    data += chunk\n"
        f"open({out!r}, 'wb').write(data)\n"
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_another_user_cannot_connect() -> None:
    """Even in a directory anyone may enter, the socket itself is 0600 (and the helper accepts
    only uid 0): nobody is refused, and root still gets its one connection afterwards."""
    dst = Path(tempfile.mkdtemp(prefix="pagechannel-", dir="/tmp"))
    dst.chmod(0o755)
    try:
        _nobody_refused(dst)
    finally:
        shutil.rmtree(dst)


def _nobody_refused(dst: Path) -> None:
    ch = PageChannel.for_dirs(str(dst), str(dst))
    out = dst / "got"
    assert helper(ch.serve_argv([PY, "-c", READ, str(out)])).returncode == 0
    probe = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "/usr/bin/python3", "-c", probe, ch.dst_sock],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    assert helper(ch.connect_argv([PY, "-c", WRITE, "ROOT"])).returncode == 0
    assert wait_file(out) == b"ROOT"
