"""The page channel (issue #14): how pages travel between the two CRIUs with no TCP port at all.

Before, a CRIU page server (stream: on the destination; post-copy: the lazy dump on the source)
listened on a loopback TCP port, reached through a port forwarded inside the source's ssh link.
Any local user could connect to that port first, or bind it once CRIU had closed it, and read
or write the workload's memory. Now:

- the destination holds a Unix socket `pages.sock` inside its 0700 image dir (only root can
  reach it), created by a small helper that accepts exactly one connection, from uid 0 only,
  and removes the socket file at once;
- the source's ssh link forwards its own `pages.sock` (again in its 0700 image dir; ssh makes
  it 0600) to that path on the destination (`ssh -O forward -L PATH:PATH`: a stream-local
  forward, no port);
- each CRIU gets the already-connected socket as a file descriptor (`--ps-socket FD`): the
  dump from a helper that connects and then execs CRIU; the destination's page server
  (stream) from the listening helper itself; the lazy-pages daemon (post-copy, started later)
  from the holding helper, which hands the connection over once, by SCM_RIGHTS, on a second
  root-only socket `pages-hand.sock`.

So no page channel exists that another local user can connect to, bind, read or write, and the
wire between hosts is the ssh link as before. Everything here is a pure function of the plan's
image dirs; `PageChannel.for_dirs` is the one place the paths are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.layout import SUN_PATH_MAX

#: The fd number CRIU gets the connected socket on (3 is background.py's --status-fd).
FD = 5
SOCK = "pages.sock"
HAND = "pages-hand.sock"
#: How long a helper waits for its one connection before giving up (a dead migration's helper
#: must not linger for ever). Post-copy's hand-over waits for the whole image transfer.
WAIT_S = 3600
TAKE_WAIT_S = 30  # the dump connected before the images were sent: it is there or never comes
ABORT_WAIT_S = 5

# One small helper, run with python3 on a host. Modes:
#   serve SOCK FD WAIT -- ARGV   listen on SOCK, detach (prints "listening" first), accept one
#                                connection from uid 0, remove SOCK, exec ARGV with it on fd FD
#   hold SOCK HAND WAIT          listen on SOCK and HAND, detach; accept one connection on SOCK,
#                                remove SOCK, then hand it (SCM_RIGHTS) to one uid-0 peer on HAND
#   connect SOCK FD -- ARGV      connect to SOCK, exec ARGV with the socket on fd FD
#   take HAND FD WAIT -- ARGV    receive the held connection from HAND, exec ARGV with it on FD
#   abort HAND WAIT              receive it, send a truncated request (4 zero bytes), close: a
#                                lazy dump then fails, which lets the source run on
# (take and abort give up after WAIT seconds: the holder hands over only once the dump is
# connected, and a dump that never started never connects.)
HELPER = r"""
import os, socket, struct, sys
mode, path = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
argv = args[args.index("--") + 1:] if "--" in args else []

def root_peer(c):
    uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    return uid == 0

def listen(p):
    if os.path.lexists(p):
        sys.exit("%s exists" % p)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(p)
    finally:
        os.umask(old)
    s.listen(4)
    return s

def accept_root(s, p, wait):
    s.settimeout(wait)
    while True:
        c, _ = s.accept()
        if root_peer(c):
            s.close()
            os.unlink(p)
            c.settimeout(None)
            return c
        c.close()

def detach(err):
    print("listening", flush=True)
    if os.fork():
        os._exit(0)
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    log = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)

def run(fd, sock_fd):
    os.umask(0o077)  # what CRIU writes (pages, logs) is root-only
    os.dup2(sock_fd, fd)
    os.execvp(argv[0], argv)

def take(p, wait):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(wait)
    c.connect(p)
    _, fds, _, _ = socket.recv_fds(c, 1, 1)
    if not fds:
        sys.exit("nothing was handed over on %s" % p)
    return fds[0]

if mode == "serve":
    s = listen(path)
    detach(path + ".err")
    c = accept_root(s, path, float(args[1]))
    run(int(args[0]), c.fileno())
elif mode == "hold":
    hand, wait = args[0], float(args[1])
    s, h = listen(path), listen(hand)
    detach(path + ".err")
    c = accept_root(s, path, wait)
    t = accept_root(h, hand, wait)
    socket.send_fds(t, [b"\0"], [c.fileno()])
elif mode == "connect":
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    run(int(args[0]), c.fileno())
elif mode == "take":
    run(int(args[0]), take(path, float(args[1])))
elif mode == "abort":
    fd = take(path, float(args[0]))
    os.write(fd, b"\0\0\0\0")
    os.close(fd)
else:
    sys.exit("unknown mode %s" % mode)
"""


def _helper(*args: str) -> list[str]:
    # -I -S: no environment, no site packages: quicker to start (post-copy's `take` runs
    # inside the freeze), and nothing but the standard library.
    return ["python3", "-I", "-S", "-c", HELPER, *args]


#: With an agent on the host (transport/agent.py), CRIU gets the socket from the agent itself:
#: this token in its argv becomes the fd's number (no helper process inside the freeze).
TOKEN = "@page-channel"


@dataclass(frozen=True)
class Call:
    """A command on the channel: its argv and the sockets the host's agent hands it."""

    argv: list[str]
    sockets: dict[str, str] = field(default_factory=dict)  # token -> socket to connect
    handed: dict[str, str] = field(default_factory=dict)  # token -> holder to take it from


def _on_token(criu_argv: list[str]) -> list[str]:
    argv = list(criu_argv)
    i = argv.index("--ps-socket")
    argv[i + 1] = TOKEN
    return argv


@dataclass(frozen=True)
class PageChannel:
    """Where one migration's page channel lives: a socket in each host's 0700 image dir."""

    src_dir: str  # the source's image root
    dst_dir: str  # the destination's image root
    lazy: bool = False  # post-copy: the dump serves pages on it (else it streams them)
    fd: int = FD

    @classmethod
    def for_dirs(cls, src_images: str, dst_images: str, lazy: bool = False) -> PageChannel:
        return cls(src_images.rstrip("/"), dst_images.rstrip("/"), lazy)

    @property
    def src_sock(self) -> str:
        return f"{self.src_dir}/{SOCK}"

    @property
    def dst_sock(self) -> str:
        return f"{self.dst_dir}/{SOCK}"

    @property
    def dst_hand(self) -> str:
        return f"{self.dst_dir}/{HAND}"

    def too_long(self) -> str | None:
        """A path the kernel cannot bind (sun_path), if any: use a shorter workdir."""
        for p in (self.src_sock, self.dst_sock, self.dst_hand):
            if len(p.encode()) > SUN_PATH_MAX:
                return p
        return None

    # --- commands, each run on one host ---------------------------------------------------

    def serve_argv(self, criu_argv: list[str]) -> list[str]:
        """Destination (stream): a page server that gets the one root connection on dst_sock.
        Returns once listening; the page server runs detached until the dump ends."""
        return _helper("serve", self.dst_sock, str(self.fd), str(WAIT_S), "--", *criu_argv)

    def hold_argv(self) -> list[str]:
        """Destination (post-copy): accept the source's lazy dump's connection and keep it for
        the lazy-pages daemon started later. Returns once listening."""
        return _helper("hold", self.dst_sock, self.dst_hand, str(WAIT_S))

    def forward_spec(self) -> str:
        """`ssh -L` argument: the source's socket to the destination's (stream-local)."""
        return f"{self.src_sock}:{self.dst_sock}"

    def connect_argv(self, criu_argv: list[str]) -> list[str]:
        """Source: connect to src_sock (the forward) and exec the dump with it on fd."""
        return _helper("connect", self.src_sock, str(self.fd), "--", *criu_argv)

    def connect(self, criu_argv: list[str], agent: bool) -> Call:
        """Source: the dump on src_sock, handed by the agent, else by the `connect` helper."""
        if agent:
            return Call(_on_token(criu_argv), sockets={TOKEN: self.src_sock})
        return Call(self.connect_argv(criu_argv))

    def take(self, criu_argv: list[str], agent: bool) -> Call:
        """Destination (post-copy): the lazy-pages daemon on the held connection, taken by
        the agent, else by the `take` helper."""
        if agent:
            return Call(_on_token(criu_argv), handed={TOKEN: self.dst_hand})
        return Call(self.take_argv(criu_argv))

    def take_argv(self, criu_argv: list[str]) -> list[str]:
        """Destination (post-copy): exec the lazy-pages daemon on the held connection."""
        return _helper("take", self.dst_hand, str(self.fd), str(TAKE_WAIT_S), "--", *criu_argv)

    def abort_argv(self) -> list[str]:
        """Destination (post-copy undo): make the lazy dump fail, so the source runs on."""
        return _helper("abort", self.dst_hand, str(ABORT_WAIT_S))

    def forward_argv(self, ssh: list[str], address: str, cancel: bool = False) -> list[str]:
        """Source: (stop) forwarding src_sock to dst_sock inside the ssh link; `ssh` is the
        link's ssh command (rsync.ssh_command with the control socket)."""
        return [*ssh, "-O", "cancel" if cancel else "forward", "-L", self.forward_spec(), address]

    def cleanup_argv(self) -> list[str]:
        """Either host: remove what is left of the channel (sockets, helper logs)."""
        files = [self.src_sock, self.dst_sock, self.dst_hand, self.dst_sock + ".err"]
        return ["rm", "-f", "--", *sorted(set(files))]


# --- CRIU command lines on the channel --------------------------------------------------------

PAGE_SERVER_LOG = "page-server.log"
LAZY_PAGES_LOG = "lazy-pages.log"


def page_server(criu: str, images_dir: str, fd: int = FD) -> list[str]:
    """`criu page-server` on an already-connected socket (not detached: `serve` detaches)."""
    return [criu, "page-server", "-D", images_dir, "--ps-socket", str(fd),
            "-o", PAGE_SERVER_LOG, "-v4"]  # fmt: skip


def lazy_pages(criu: str, images_dir: str, fd: int = FD) -> list[str]:
    """`criu lazy-pages` pulling from the source's lazy dump over an already-connected socket."""
    return [criu, "lazy-pages", "--page-server", "--ps-socket", str(fd),
            "-D", images_dir, "-o", LAZY_PAGES_LOG, "-v4"]  # fmt: skip


def dump_flags(channel: PageChannel) -> list[str]:
    """The dump's flags for the channel: stream pages to it, or serve them lazily on it."""
    return ["--lazy-pages" if channel.lazy else "--page-server", "--ps-socket", str(channel.fd)]


# --- prefault (stream): touch, then free, the memory the destination is about to take -------

# Touch MiB of fresh anonymous memory (at most half of MemFree: no page cache is pushed out),
# then exit and free it: the page cache and the restore that follow get pages just backed.
# MADV_POPULATE_WRITE (Linux 5.14) faults it in within the kernel; else one write per page.
PREFAULT = r"""
import mmap, sys, time
t = time.monotonic()
free = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemFree:"))
n = min(int(sys.argv[1]), free // 2048) << 20
if n:
    m = mmap.mmap(-1, n)
    try:
        m.madvise(23)
    except OSError:
        m[::4096] = bytes(len(range(0, n, 4096)))
print("prefaulted %d MiB in %.0f ms" % (n >> 20, (time.monotonic() - t) * 1000))
"""


def prefault_mib(rss_kb: int) -> int:
    """What the destination will take for a tree of rss_kb: its pages in the page server's
    page cache, then in the restored tree (2 x RSS), in MiB."""
    return 2 * -(-rss_kb // 1024)


def prefault_argv(mib: int) -> list[str]:
    """Destination (stream, before the freeze): touch then free mib MiB (capped there)."""
    return ["python3", "-I", "-S", "-c", PREFAULT, str(mib)]
