"""Runtime `lxc`: an LXC container, moved with `lxc-checkpoint`.

Decided by measurement (lab, LXC 5.0.2, CRIU 4.2.1, busybox container): `lxc-checkpoint`
took 0.25-0.3 s idle (0.46-0.53 s on a loaded machine), `criu dump` run by hand with the very
options LXC uses 0.21-0.55 s on the same loaded machine: no difference worth having. And LXC
already passes CRIU what the seed's manual recipe passed by hand (seen by logging its argv):
the container's init pid (`-t`), its cgroup roots (`--cgroup-root`, `--freeze-cgroup`), its
external mounts (`--ext-mount-map`), the console pty as an external tty re-attached on
restore (`--external tty[..]`, `--inherit-fd`), and each veth re-plugged into its configured
bridge on the destination with its MAC from the images (`--veth-pair`). What decides it is
the restore: LXC's restore runs CRIU against what lxc-start prepares (the rootfs mounted at
its `--root`, the console pty, the cgroups) and leaves the container under LXC's monitor, so
`lxc-info`, `lxc-stop` and `lxc-attach` work on the destination. CRIU alone would need all of
that re-implemented here, and its copy would run without a monitor, unknown to LXC.

The source is frozen first (`lxc-freeze`) and checkpointed without `-s`: CRIU leaves its
freezer as it found it, so the source stays FROZEN (not killed) until the destination runs
the container; confirm then stops it (`lxc-stop -k`), a rollback thaws it (`lxc-unfreeze`).
CRIU restores the freezer state too (FROZEN, which LXC does not notice), so the destination
copy is frozen and thawed through LXC after its restore.

The container's directory (config, and rootfs when it is a plain directory) travels with
the images, mirrored to the same lxcpath on the destination.
"""

from __future__ import annotations

from orchestrator.checkpoint import Checkpoint
from orchestrator.criu import commands as criu
from orchestrator.errors import MigrationError
from orchestrator.runtimes import net, procs
from orchestrator.runtimes.base import Target
from orchestrator.runtimes.container import ContainerRuntime, criu_failed, detached
from orchestrator.runtimes.lxc_criu import RCFILE, RESTORED, WRAPPER
from orchestrator.transport.ssh import Host

LXCPATH = "/var/lib/lxc"
ERR = "lxc.err"
_STATES = {"RUNNING": procs.RUNNING, "FROZEN": procs.STOPPED, "FREEZING": procs.STOPPED,
           "THAWED": procs.RUNNING, "STOPPED": procs.GONE}  # fmt: skip
# lxc-checkpoint runs `criu` from PATH: lxc_criu.WRAPPER goes first on it, over the real one
# (the configured criu, found on the host's PATH).
_WITH_CRIU = (
    'criu=$1 bin=$2 wrapper=$3; shift 3; c=$(command -v "$criu") || exit 127; '
    'mkdir -p "$bin" && printf "%s\\n" "$c" > "$bin/real" && printf "%s" "$wrapper" > "$bin/criu" '
    '&& chmod 700 "$bin/criu" && PATH="$bin:$PATH" && exec "$@"'
)

# Each network of the container: "TYPE LINK PAIR" a line (until LXC says the index is invalid).
_NETS = (
    'p=$1 n=$2; i=0; while t=$(lxc-info -P "$p" -n "$n" -c "lxc.net.$i.type" 2>/dev/null) '
    '&& [ -n "$t" ]; do for k in type link veth.pair; do '
    'printf "%s " "$(lxc-info -P "$p" -n "$n" -c "lxc.net.$i.$k" | sed "s/^[^=]*= *//")"; '
    "done; echo; i=$((i+1)); done"
)
_NO_TTYS = (
    'conf=$1 rc=$2; shift 2; { grep -v "^[[:space:]]*lxc.\\(tty\\|pty\\).max" "$conf"; '
    'printf "lxc.tty.max = 0\\nlxc.pty.max = 1\\n"; } > "$rc" && exec "$@"'
)
# The init CRIU restored (its pidfile, written by lxc_criu's wrapper) if it still runs in an LXC
# payload cgroup (not a reused pid): its freezer thawed (a frozen task cannot die), then killed
# with its whole pid namespace.
_KILL_RESTORED = (
    'pid=$(cat -- "$1" 2>/dev/null) && grep -q lxc.payload "/proc/$pid/cgroup" || exit 0; '
    'for f in $(sed -n "s/^[0-9]*:freezer:/\\/sys\\/fs\\/cgroup\\/freezer/p" "/proc/$pid/cgroup"); '
    'do echo THAWED > "$f/freezer.state"; done; '
    'f=$(sed -n "s/^0:://p" "/proc/$pid/cgroup"); '
    '[ -e "/sys/fs/cgroup$f/cgroup.freeze" ] && echo 0 > "/sys/fs/cgroup$f/cgroup.freeze"; '
    'kill -KILL "$pid"'
)
_FREEZE_THEN = 'lxc-freeze -P "$1" -n "$2" && shift 2 && exec "$@"'
_THEN_THAW = (
    'p=$1 n=$2; shift 2; "$@" && lxc-freeze -P "$p" -n "$n" && lxc-unfreeze -P "$p" -n "$n"'
)


class LxcRuntime(ContainerRuntime):
    name = "lxc"
    tool = "lxc-checkpoint"

    @property
    def lxcpath(self) -> str:
        return (self.workload.lxcpath or LXCPATH).rstrip("/") or "/"

    def lxc(self, tool: str, *args: str) -> list[str]:
        return [tool, "-P", self.lxcpath, "-n", self.container, *args]

    def status(self, host: Host) -> tuple[str, int]:
        r = host.run(self.lxc("lxc-info", "-s", "-p"), mutates=False)  # "State: X", "PID: N"
        info = dict(ln.partition(":")[::2] for ln in r.stdout.splitlines()) if r.ok else {}
        state = _STATES.get(info.get("State", "").strip(), procs.GONE)
        pid = info.get("PID", "").strip()
        return state, int(pid) if pid.isdigit() and state != procs.GONE else 0

    def paths(self, host: Host, pid: int) -> list[str]:
        home = f"{self.lxcpath}/{self.container}"
        r = host.run(self.lxc("lxc-info", "-c", "lxc.rootfs.path"), mutates=False)
        rootfs = r.stdout.partition("=")[2].strip()
        rootfs = rootfs.removeprefix("dir:")
        if not rootfs.startswith("/"):
            raise MigrationError(
                f"lxc container {self.container}: rootfs {rootfs or '?'} on {host} is not a "
                "plain directory; only directory rootfs can travel"
            )
        inside = rootfs == home or rootfs.startswith(home + "/")
        return [home] if inside else [home, rootfs]

    def more_preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        """Each veth is re-plugged into its configured bridge on the destination, under its
        configured host-side name: both must be possible there."""
        r = src.run(["sh", "-c", _NETS, "sh", self.lxcpath, self.container], mutates=False)
        problems = []
        for line in r.stdout.splitlines():
            kind, link, pair = (line.split() + ["", "", ""])[:3]
            if kind != "veth":
                continue
            if link and not dst.run(["ip", "link", "show", "dev", link], mutates=False).ok:
                problems.append(f"bridge {link} (lxc container {self.container}) is not on {dst}")
            if pair and dst.run(["ip", "link", "show", "dev", pair], mutates=False).ok:
                problems.append(f"an interface named {pair} already exists on {dst}")
        return problems

    def _with_criu(self, host: Host, images_dir: str, argv: list[str]) -> list[str]:
        bin_dir = f"{images_dir}/.criu"
        return ["sh", "-c", _WITH_CRIU, "sh", host.config.criu, bin_dir, WRAPPER, *argv]

    def _checkpoint(self, host: Host, target: Target, cp: Checkpoint) -> None:
        images_dir = cp.images_dir
        # Freeze, then checkpoint: one round trip. A failed checkpoint leaves it frozen
        # (CRIU restores the freezer as it found it): the dump's undo thaws it.
        argv = ["sh", "-c", _FREEZE_THEN, "sh", self.lxcpath, self.container,
                *self.lxc("lxc-checkpoint", "-D", images_dir)]  # fmt: skip
        r = detached(host, self._with_criu(host, images_dir, argv), f"{images_dir}/{ERR}")
        criu_failed(host, r, images_dir, criu.DUMP_LOG, "dump (lxc-freeze, lxc-checkpoint)")

    def restore(self, host: Host, target: Target, images_dir: str, lazy: bool = False) -> int:
        # Restore, then thaw (one round trip): CRIU restored the freezer as dumped (FROZEN)
        # while LXC believes the container runs, so a bare lxc-unfreeze would do nothing.
        # LXC's restore reads the container's config with no ttys (lxc.tty.max = 0): its
        # monitor has none to serve after a restore (it would end at once, leaving the
        # container without one); the ttys come back as the wrapper's ptys (lxc_criu).
        rcfile = f"{images_dir}/.criu/{RCFILE}"
        restore = self.lxc("lxc-checkpoint", "-r", "-D", images_dir, "--rcfile", rcfile)
        argv = ["sh", "-c", _THEN_THAW, "sh", self.lxcpath, self.container,
                "sh", "-c", _NO_TTYS, "sh", f"{self.lxcpath}/{self.container}/config", rcfile,
                *restore]  # fmt: skip
        r = detached(host, self._with_criu(host, images_dir, argv), f"{images_dir}/{ERR}")
        if not r.ok:
            host.run(self.lxc("lxc-stop", "-k"))
            # A tree CRIU restored that LXC then lost (no monitor): frozen, unknown to LXC.
            host.run(["sh", "-c", _KILL_RESTORED, "sh", f"{images_dir}/.criu/{RESTORED}"])
        criu_failed(host, r, images_dir, criu.RESTORE_LOG, "restore (lxc-checkpoint -r)")
        return self.running_pid(host, "lxc-checkpoint -r")

    def resume(self, host: Host, target: Target, images_dir: str) -> None:
        if self.status(host)[0] == procs.STOPPED:
            host.run(self.lxc("lxc-unfreeze"), check=True)
            # A destination copy undone after its restore announced the address there.
            pid = self.status(host)[1]
            if pid:
                host.run(net.announce_all_argv(pid))

    def remove(self, host: Host, root_pid: int) -> None:
        if self.status(host)[0] != procs.GONE:
            host.run(self.lxc("lxc-stop", "-k"), check=True)
