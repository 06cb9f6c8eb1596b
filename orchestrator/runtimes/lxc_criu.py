"""The `criu` lxc-checkpoint runs (first on its PATH): the real CRIU, given what LXC 5 leaves
out for a container made from the distribution's config (common.conf: `lxc.tty.max` ttys,
`lxc.tty.dir = lxc`, a console).

- dump: each pty bind-mounted into the container whose master is outside it (LXC's ttys
  `/dev/lxc/ttyN`, held by LXC's monitor; after a move, by the holder below) is an external
  mount (`--ext-mount-map PATH:KEY`), and each open fd on one an external tty
  (`--external tty[rdev:dev]`); without them CRIU stops at "Unable to find a master". The
  console is LXC's own (it passes it as an external tty itself). What was found is written to
  IMAGES/lxc-ttys.json, which travels with the images.
- restore: a fresh pty for each of them, mounted in its place (`--ext-mount-map KEY:/dev/pts/N`)
  and given to the tasks that had it open (`--inherit-fd fd[N]:tty[rdev:dev]`); their masters
  are kept open (and drained) by a small holder process for as long as LXC's monitor of the
  container lives (a pty whose master closes is gone: the next dump could not find it). Host
  paths of external bind mounts are given resolved (`/lib` is a symlink on merged-/usr hosts:
  CRIU's move_mount of a symlink fails with EINVAL).

The real criu's path is in REAL next to this script; its directory leaves PATH before the
exec, so a criu that looks for "the next criu on PATH" finds the real one, never this one.
"""

from __future__ import annotations

RCFILE = "config"  # in the wrapper's directory: the config LXC's restore reads
RESTORED = "restored.pid"  # in the wrapper's directory: the init CRIU restored

WRAPPER = r'''#!/usr/bin/env python3
import json, os, pty, select, signal, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "real")) as f:
    REAL = f.read().strip()
TTYS = "lxc-ttys.json"


def value(args, name):
    return args[args.index(name) + 1] if name in args[:-1] else None


def outside_ttys(init):
    """Single-pty devpts bind mounts of the container (not its console) and the tty ids
    of the fds open on them."""
    root = f"/proc/{init}/root"
    try:
        console = os.stat(root + "/dev/console")
        skip = (console.st_rdev, console.st_dev)
    except OSError:
        skip = None
    points = {}
    with open(f"/proc/{init}/mountinfo") as f:
        for line in f:
            w = line.split()
            fstype = w[w.index("-") + 1]
            if fstype == "devpts" and w[3][1:].isdigit() and w[4] != "/dev/console":
                points[w[4]] = os.stat(root + w[4])
    ids = {}
    # An fd restored onto one of them (--inherit-fd) shows the host's path: match devices.
    where = {(st.st_rdev, st.st_dev): p for p, st in points.items()}
    pidns = os.readlink(f"/proc/{init}/ns/pid")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/ns/pid") != pidns:
                continue
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            point = where.get((st.st_rdev, st.st_dev))
            if point and (st.st_rdev, st.st_dev) != skip:
                ids[point] = f"tty[{st.st_rdev:x}:{st.st_dev:x}]"
    # Another mount of the console's pty (/dev/lxc/console) goes where LXC puts the console.
    return [{"mount": p, "key": f"lxc-pty{i}", "id": ids.get(p),
             "console": (st.st_rdev, st.st_dev) == skip}
            for i, (p, st) in enumerate(sorted(points.items()))]


def started(pid):
    """pid's start time (field 22 of its stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def hold(masters):
    """A process of its own (reaped child in between: CRIU gets no stray child) keeps the
    masters open and drained while the monitor (our parent) lives (unknown: while a slave
    is open)."""
    monitor = os.getppid()
    since = started(monitor) if monitor > 1 else None
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # LXC's may be ignored
        signal.signal(sig, signal.SIG_DFL)
    null = os.open("/dev/null", os.O_RDWR)
    log = os.open(os.path.join(HERE, "holder.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    keep = {*masters, 0, 1, 2}
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    while since is None or started(monitor) == since:
        ready = select.select(masters, [], [], 1.0)[0]
        closed = 0  # masters whose slave nobody has open (a read gives EIO)
        for m in ready:
            try:
                os.read(m, 65536)
            except OSError:
                closed += 1
        if since is None and closed == len(masters):
            break
        if ready and closed == len(ready):
            time.sleep(1.0)  # only EIO: nothing to drain, look again in a second
    os._exit(0)


def main():
    for fd in (0, 1, 2):  # LXC may exec us with stdin closed: no pty may take fds 0-2
        try:
            os.fstat(fd)
        except OSError:
            os.open("/dev/null", os.O_RDWR)
    args = sys.argv[1:]
    images = value(args, "-D")
    if args and args[0] == "dump" and images and value(args, "-t"):
        ttys = outside_ttys(int(value(args, "-t")))
        with open(os.path.join(images, TTYS), "w") as f:
            json.dump(ttys, f)
        for t in ttys:
            args += ["--ext-mount-map", f"{t['mount']}:{t['key']}"]
            if t["id"]:
                args += ["--external", t["id"]]
    elif args and args[0] == "restore" and images:
        if "--pidfile" not in args:
            args += ["--pidfile", os.path.join(HERE, "restored.pid")]
        for i, a in enumerate(args[:-1]):
            key, _, path = args[i + 1].partition(":")
            if a == "--ext-mount-map" and path.startswith("/") and os.path.exists(path):
                args[i + 1] = f"{key}:{os.path.realpath(path)}"
        path = os.path.join(images, TTYS)
        ttys = json.load(open(path)) if os.path.exists(path) else []
        masters = []
        console = next((v.partition(":")[2] for k, v in zip(args, args[1:])
                        if k == "--ext-mount-map" and v.startswith("console:")), "")
        for t in ttys:
            if t.get("console"):
                if console:
                    args += ["--ext-mount-map", f"{t['key']}:{console}"]
                continue
            master, slave = pty.openpty()
            os.set_inheritable(slave, True)
            masters.append(master)
            args += ["--ext-mount-map", f"{t['key']}:{os.ttyname(slave)}"]
            if t["id"]:
                args += ["--inherit-fd", f"fd[{slave}]:{t['id']}"]
        if masters:
            hold(masters)
    os.environ["PATH"] = ":".join(
        d for d in os.environ.get("PATH", "").split(":") if os.path.abspath(d or ".") != HERE
    )
    os.execv(REAL, [REAL, *args])


main()
'''
