"""The per-host agent (issue 15): the program the controller starts on each host over its ssh
connection, once, when it connects (transport/agent.py sends this file's text; nothing is
installed). Python's standard library only.

It reads requests (one JSON object a line) on stdin and answers each on stdout, tagged with the
request's id, from a thread of its own, so that requests overlap. It runs argv lists itself:
no shell, no rc file, no ssh session per command, which is what a command cost inside the freeze
before (~0.2 s each). Ops:

- ping: the host's clock (the controller estimates the offset between the clocks).
- run: argv, with a timeout (past it the command's process group is killed: it never goes on
  later), a umask, and Unix sockets to connect and hand the command as file descriptors (the
  page channel: no helper process in between). Answers exit code, output, and when it started
  and ended on the host's clock. With `detach` (a dir and a NAME), the command is CRIU to run
  on after the answer (post-copy's lazy dump and lazy-pages daemon): started under a forked
  copy of this agent that records its exit code in DIR/NAME.rc, and answered "ready" once it
  says so on its --status-fd, or "exited RC" (the contract of criu/background.py's sh
  wrapper, without a shell or a new interpreter inside the freeze).
- read: a small file's bytes (CRIU's stats, a pidfile), no process started.
- lock / unlock: a workload's migration lock (an flock) held by the agent itself, so released
  when it ends with its connection (no ssh session of its own per migration).
- listen / collect / cancel: receive one image dir on a root-only Unix socket (one connection,
  from uid 0) into a dir, before the freeze; collect waits for it to have arrived and says what
  arrived, each file's CRC-32 and size read back from the disk.
- connect / send: connect to such a socket (through the ssh link's forward, before the freeze:
  a connection there opens an ssh channel), then send an image dir on that connection, CRC-32
  and size of each file as read.

When stdin closes (the controller or its connection went) it exits; commands it started run on.
"""

import base64
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

# _detach forks this (threaded) agent on purpose: the copy only closes, spawns and waits.
warnings.filterwarnings("ignore", category=DeprecationWarning)

CHUNK = 1 << 20
#: What an image dir holds that is not an image: logs, exit codes, FIFOs, sockets.
SKIP_SUFFIXES = (".log", ".err", ".rc", ".ready", ".sock", ".part", ".tmp")
READ_MAX = 64 << 20

_out_lock = threading.Lock()
_receivers: dict = {}  # socket path -> Receiver
_held: dict = {}  # socket path -> the connection op_connect made, for op_send
_locks: dict = {}  # lock path -> the fd holding its flock


def reply(msg):
    data = (json.dumps(msg) + "\n").encode()
    with _out_lock:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def op_ping(req):
    return {"time": time.time(), "pid": os.getpid()}


def _high(fd):
    """fd, moved to 10 or above (clear of a shell's 3>...), close-on-exec until handed over."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    os.set_blocking(high, True)  # (a socket with a timeout was made non-blocking)
    return high


def _connect(path, handed):
    """A connection to the Unix socket path; with handed, the connection a holder there hands
    over (SCM_RIGHTS) instead."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        s.settimeout(30)
        s.connect(path)
        if not handed:
            return _high(s.detach())
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
    if not fds:
        raise OSError(f"nothing was handed over on {path}")
    return _high(fds[0])


def op_run(req):
    argv = [str(a) for a in req["argv"]]
    fds = []
    try:
        for key, handed in (("sockets", False), ("handed", True)):
            for token, path in (req.get(key) or {}).items():
                fd = _connect(path, handed)
                fds.append(fd)
                argv = [str(fd) if a == token else a for a in argv]
        if req.get("detach"):
            top, name = req["detach"]
            return _detach(argv, fds, top, name, float(req.get("timeout") or 60))
        umask = req.get("umask")
        started = time.time()
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=fds,
                umask=-1 if umask is None else int(umask),
            )
        except OSError as e:
            return {"rc": 127, "out": "", "err": f"{argv[0]}: {e.strerror}",
                    "started": started, "ended": time.time()}  # fmt: skip
        for fd in fds:  # the command has them now
            os.close(fd)
        fds = []
        timed_out = False
        try:
            out, err = p.communicate(timeout=req.get("timeout"))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                out, err = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild holds the pipes: let them be
                out, err = b"", b""
        ended = time.time()
        return {
            "rc": p.wait(),
            "out": out.decode("utf-8", "replace"),
            "err": err.decode("utf-8", "replace"),
            "started": started,
            "ended": ended,
            "timed_out": timed_out,
        }
    finally:
        for fd in fds:
            os.close(fd)


def _detach(argv, fds, top, name, wait):
    """Start CRIU's argv (plus --status-fd) to outlive this agent; answer once it is ready."""
    rc = os.path.join(top, name + ".rc")
    for stale in (rc, rc + ".tmp"):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    ready_r, ready_w = os.pipe()
    keep = [ready_w, *fds]
    for fd in keep:
        os.set_inheritable(fd, True)
    argv = [*argv, "--status-fd", str(ready_w)]
    started = time.time()
    pid = os.fork()
    if pid == 0:
        _supervise(argv, keep, os.path.join(top, name + ".err"), rc)
    threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
    for fd in keep:
        os.close(fd)
    fds.clear()
    try:
        ready = bool(select.select([ready_r], [], [], wait)[0]) and os.read(ready_r, 1) != b""
    finally:
        os.close(ready_r)
    out = "ready\n"
    if not ready:  # ended (or silent past the wait): its exit code, once recorded
        deadline = time.monotonic() + 5
        while not os.path.exists(rc) and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            with open(rc) as f:
                out = "exited {}\n".format(f.read().strip() or "unknown")
        except OSError:
            out = "exited unknown\n"
    return {"rc": 0, "out": out, "err": "", "started": started, "ended": time.time()}


def _supervise(argv, keep, err_path, rc):
    """The forked copy: its own session, nothing of the agent's open but what CRIU gets;
    runs argv, writes its exit code (as sh would: 128+N for signal N) to rc, and exits."""
    code = 1
    try:
        os.setsid()
        os.umask(0o077)
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for target, fd in ((0, null), (1, null), (2, err)):
            os.dup2(fd, target)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            child = os.posix_spawnp(argv[0], argv, os.environ)
        except OSError:
            exit_code = 127
        else:
            for fd in keep:
                os.close(fd)
            exit_code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        with open(rc + ".tmp", "w") as f:
            f.write(f"{exit_code if exit_code >= 0 else 128 - exit_code}\n")
        os.replace(rc + ".tmp", rc)
        code = 0
    finally:
        os._exit(code)


def op_lock(req):
    """Take the exclusive flock on path (its dir made 0700) and hold it for as long as this
    agent lives (so a controller that dies frees it: its connection closes, the agent ends),
    writing holder into it; or say who holds it."""
    path = req["path"]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # (flock is per open file: this agent's own second take fails too)
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        return {"busy": True, "holder": holder}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (req["holder"] + "\n").encode(), 0)
    _locks[path] = fd
    return {"locked": True}


def op_unlock(req):
    fd = _locks.pop(req["path"], None)
    if fd is not None:
        os.close(fd)
    return {"unlocked": fd is not None}


def _children(pid):
    """pid's children, from /proc/PID/task/*/children (every thread's)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def op_stop_tree(req):
    """SIGSTOP a process tree (root and every descendant), in this process: no program
    starts (post-copy sends it inside the freeze)."""
    todo, stopped = [int(req["root"])], []
    while todo:
        pid = todo.pop()
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            continue
        stopped.append(pid)
        todo += _children(pid)
    return {"stopped": stopped}


def op_read(req):
    try:
        with open(req["path"], "rb") as f:
            data = f.read(READ_MAX + 1)
    except FileNotFoundError:
        return {"missing": True}
    if len(data) > READ_MAX:
        return {"error": f"{req['path']} is larger than {READ_MAX} bytes"}
    return {"data": base64.b64encode(data).decode()}


def _files(top):
    """(relative path, kind, size or link target) under top, sorted, images only."""
    out = []
    for here, dirs, names in os.walk(top):
        dirs.sort()
        for name in sorted(dirs + names):
            path = os.path.join(here, name)
            rel = os.path.relpath(path, top)
            if name.endswith(SKIP_SUFFIXES):
                continue
            if os.path.islink(path):
                out.append((rel, "link", os.readlink(path)))
            elif name in dirs:
                out.append((rel, "dir", 0))
            elif os.path.isfile(path):
                out.append((rel, "file", os.path.getsize(path)))
    return out


def _line(sock_file, msg):
    sock_file.write((json.dumps(msg) + "\n").encode())


def op_connect(req):
    """Connect to the socket path now (before the freeze: through a forward, a connection
    opens an ssh channel) and hold the connection for the send that follows."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(req["sock"])
    _close_held(req["sock"])
    _held[req["sock"]] = s
    return {"connected": True}


def _close_held(path):
    held = _held.pop(path, None)
    if held is not None:
        held.close()


def op_send(req):
    top, bwlimit = req["dir"], int(req.get("bwlimit") or 0) * 1024
    s = _held.pop(req["sock"], None)
    if s is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(req["sock"])
    s.settimeout(req.get("stall"))  # no progress this long: the link is gone
    t0 = time.monotonic()
    sent, files = 0, {}
    view = memoryview(bytearray(CHUNK))  # one buffer for every chunk: no allocation per chunk
    with s, s.makefile("wb", buffering=CHUNK) as w:
        for rel, kind, what in _files(top):
            if kind != "file":
                _line(w, {"path": rel, "kind": kind, "target": what})
                continue
            _line(w, {"path": rel, "kind": "file", "size": what})
            crc, left = 0, what
            with open(os.path.join(top, rel), "rb", buffering=0) as f:
                while left:
                    n = f.readinto(view[: min(CHUNK, left)])
                    if not n:  # shrank while being sent: the receiver sees it short
                        break
                    w.write(view[:n])
                    crc = zlib.crc32(view[:n], crc)
                    left -= n
                    sent += n
                    if bwlimit:
                        ahead = sent / bwlimit - (time.monotonic() - t0)
                        if ahead > 0:
                            w.flush()
                            time.sleep(ahead)
            if left:
                raise OSError(f"{rel} shrank while it was being sent")
            _line(w, {"crc": crc})
            files[rel] = [crc, what]
        _line(w, {"end": True})
        w.flush()
        s.shutdown(socket.SHUT_WR)
        ack = s.recv(16)
    if ack != b"ok\n":
        raise OSError("the destination did not take the images")
    return {"files": files, "bytes": sent, "seconds": time.monotonic() - t0}


def _crc_of(path):
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


class Receiver:
    """One image dir arriving on a root-only socket: accept one root peer, write the files as
    .NAME.part (0600), read each back, and only then give them their names."""

    def __init__(self, sock_path, top, wait, stall=None):
        self.path, self.top, self.stall, self.wait = sock_path, top, stall, wait
        self.conn = None
        if os.path.lexists(sock_path):
            raise OSError(f"{sock_path} exists")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(sock_path)
        finally:
            os.umask(old)
        self.listener.listen(4)
        self.listener.settimeout(wait)
        self.result = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            self.result = self._receive()
        except Exception as e:  # every failure reaches collect
            self.result = {"error": f"{type(e).__name__}: {e}"}
        finally:
            self.cancel()
            self.done.set()

    def _accept(self):
        while True:
            c, _ = self.listener.accept()
            cred = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if struct.unpack("3i", cred)[1] == 0:
                c.settimeout(self.wait)  # connected before the freeze: the images come later
                self.conn = c
                self.cancel()
                return c
            c.close()

    def _receive(self):
        c = self._accept()
        os.makedirs(self.top, mode=0o700, exist_ok=True)
        got, parts, nbytes = {}, [], 0
        view = memoryview(bytearray(CHUNK))  # one buffer for every chunk
        with c, c.makefile("rb", buffering=CHUNK) as r:
            while True:
                head = json.loads(r.readline() or b'{"eof": true}')
                c.settimeout(self.stall)
                if head.get("end") or head.get("eof"):
                    if head.get("eof"):
                        raise OSError("the images stopped short")
                    break
                rel = os.path.normpath(head["path"])
                if rel.startswith("..") or os.path.isabs(rel):
                    raise OSError("refused path {!r}".format(head["path"]))
                dest = os.path.join(self.top, rel)
                if head["kind"] == "dir":
                    os.makedirs(dest, mode=0o700, exist_ok=True)
                    continue
                if head["kind"] == "link":
                    if os.path.lexists(dest):
                        os.unlink(dest)
                    os.symlink(head["target"], dest)
                    continue
                part = os.path.join(os.path.dirname(dest), "." + os.path.basename(dest) + ".part")
                left = head["size"]
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    while left:
                        n = r.readinto(view[: min(CHUNK, left)])
                        if not n:
                            raise OSError(f"{rel} stopped short")
                        f.write(view[:n])
                        left -= n
                        nbytes += n
                # The sender's CRC-32 (its trailer) is not checked here: the controller
                # compares it with the read-back below, which also covers the way.
                json.loads(r.readline() or b"{}")
                parts.append((rel, part, dest))
            for rel, part, _ in parts:  # what is on the disk, read back
                got[rel] = [_crc_of(part), os.path.getsize(part)]
            for _, part, dest in parts:
                os.replace(part, dest)
            c.sendall(b"ok\n")
        return {"files": got, "bytes": nbytes}

    def abort(self):
        """Stop listening, and drop a connection taken before the images came."""
        self.cancel()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self):
        try:
            self.listener.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def op_listen(req):
    _receivers[req["sock"]] = Receiver(
        req["sock"], req["dir"], float(req.get("wait", 3600)), req.get("stall")
    )
    return {"listening": True}


def op_collect(req):
    rec = _receivers.get(req["sock"])
    if rec is None:
        return {"error": "nothing listens on {}".format(req["sock"])}
    if not rec.done.wait(req.get("timeout")):
        return {"error": "the images did not arrive in time"}
    _receivers.pop(req["sock"], None)
    return rec.result


def op_cancel(req):
    """Drop what waits on the socket path: a receiver (destination), a held connection (source)."""
    rec = _receivers.pop(req["sock"], None)
    if rec is not None:
        rec.abort()
    _close_held(req["sock"])
    return {"cancelled": rec is not None}


OPS = {"ping": op_ping, "run": op_run, "read": op_read, "connect": op_connect, "send": op_send,
       "listen": op_listen, "collect": op_collect, "cancel": op_cancel, "lock": op_lock,
       "unlock": op_unlock, "stop_tree": op_stop_tree}  # fmt: skip


def serve(req):
    try:
        res = OPS[req["op"]](req)
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    res["id"] = req["id"]
    reply(res)


def main():
    reply({"id": 0, "ready": True, "time": time.time(), "pid": os.getpid()})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        req = json.loads(line)
        threading.Thread(target=serve, args=(req,), daemon=True).start()


if __name__ == "__main__":
    main()
