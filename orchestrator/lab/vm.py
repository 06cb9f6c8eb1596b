"""A throw-away qemu VM whose kernel has soft-dirty tracking (this machine's has none), for
proving pre-copy for real.

The guest is Debian 12's stock kernel (``linux-image-6.1.0-*-amd64-unsigned``, fetched with
``apt-get download`` into CACHE by scripts/setup-host) and a tiny busybox initramfs whose init
mounts the host's ``/`` read-only over 9p, puts tmpfs on the writable dirs, and runs one shell
command chrooted there: the guest sees the host's binaries and this repo. A second, writable 9p
share brings back the command's output and exit code. qemu runs under TCG (KVM is broken
here), with no network device. ``run()`` boots, waits, and always kills qemu.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .state import LabError

CACHE = Path(os.environ.get("MIGRATE_VM_CACHE", "/var/cache/migrate-vm"))
# Debian 12's 6.1 (the one proven here), else any stock amd64 kernel (e.g. Debian 13's 6.12;
# Debian's configs all have CONFIG_MEM_SOFT_DIRTY=y and 9p as modules).
PACKAGE_GLOBS = ("linux-image-6.1.0-*-amd64-unsigned_*.deb", "linux-image-*-amd64-unsigned_*.deb")
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"  # busybox-static: runs without any library
# What the initramfs loads (with their dependencies) to mount the host's / over 9p.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# Writable tmpfs dirs in the guest (the host's / is read-only there).
WRITABLE = ("/tmp", "/run", "/var/tmp", "/var/log")
OUT = "/run/vm-out"  # where the results share is mounted inside the guest

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod "/mods/$m" || echo "init: insmod $m failed"; done
o=trans=virtio,version=9p2000.L,msize=524288
# The host's / does not change under the guest: let it cache (cache=none: imports take 10x).
mount -t 9p -o "ro,$o,cache=loose" root /newroot || { echo "init: cannot mount /"; poweroff -f; }
for d in @WRITABLE@; do mount -t tmpfs -o mode=0755,size=75% tmp "/newroot$d"; done
chmod 1777 /newroot/tmp /newroot/var/tmp
mkdir -p "/newroot@OUT@" && mount -t 9p -o "$o,cache=none" out "/newroot@OUT@"
# A directory the tmpfs mounts above would hide (e.g. a checkout under /tmp), shared again.
share=$(sed -n 's/.*migrate_share=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$share" ]; then
  mkdir -p "/newroot$share" && mount -t 9p -o "ro,$o,cache=loose" share "/newroot$share" \
    || echo "init: cannot mount $share"
fi
# Module autoload with the host's own modprobe, from this kernel's modules (on the host).
printf '#!/bin/sh\nexec /sbin/modprobe -d "@TREE@" "$@"\n' > /newroot/run/vm-modprobe
chmod 755 /newroot/run/vm-modprobe
echo /run/vm-modprobe > /proc/sys/kernel/modprobe
mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
cp /stage2 /newroot/run/vm-stage2
# The host's / becomes this namespace's root (not a chroot: paths must resolve across the
# mount namespaces the lab makes).
exec switch_root /newroot /bin/busybox sh /run/vm-stage2
"""

# Pid 1 after switch_root: the rest of the set-up, then the command; its exit code; power off.
STAGE2 = r"""export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /dev/pts /dev/shm /run/sshd /run/netns
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
/run/vm-modprobe tun  # CRIU checks /dev/net/tun
ip link set lo up
hostname vm
# bash sources root's ~/.bashrc for every ssh command; an interactive set-up there (pyenv
# here) costs seconds per command under TCG. The guest's shells start clean.
: > /run/vm-empty-rc
[ -f /root/.bashrc ] && mount --bind /run/vm-empty-rc /root/.bashrc
echo 4194304 > /proc/sys/kernel/pid_max  # the lab hands out pids from 150001
/usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 VM_OUT=@OUT@ \
  /bin/sh @OUT@/cmd.sh </dev/null >@OUT@/output 2>&1
echo $? > @OUT@/rc
sync
umount @OUT@
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class Assets:
    """A kernel with soft-dirty, its modules, and an initramfs that boots the host's /."""

    version: str
    kernel: Path  # uncompressed vmlinux (PVH: boots ~5 s faster under TCG), else the bzImage
    modules: Path  # lib/modules/VERSION, depmod'ed
    initramfs: Path


@dataclass(frozen=True)
class Result:
    exit_code: int
    output: str
    console: str
    seconds: float


def missing() -> str | None:
    """Why a VM cannot be run here (None: it can): qemu, busybox-static, kernel package."""
    if os.geteuid() != 0:
        return "the VM harness needs root (9p export of /)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86; scripts/setup-host does)"
    if not Path(BUSYBOX).is_file() or _is_dynamic(Path(BUSYBOX)):
        return f"{BUSYBOX} is not a static busybox (apt-get install busybox-static)"
    if shutil.which("depmod") is None:
        return "depmod not found (apt-get install kmod)"
    if not _package():
        return f"no {PACKAGE_GLOBS[-1]} in {CACHE} (scripts/setup-host fetches it)"
    return None


def _is_dynamic(path: Path) -> bool:
    return b"ld-linux" in path.read_bytes()[:8192]


def _package() -> Path | None:
    for pattern in PACKAGE_GLOBS:
        debs = sorted(CACHE.glob(pattern))
        if debs:
            return debs[-1]
    return None


def prepare(cache: Path = CACHE) -> Assets:
    """Extract the kernel package (once), depmod it, build the initramfs (once)."""
    reason = missing()
    if reason:
        raise LabError(f"cannot run the VM: {reason}")
    deb = _package()
    assert deb is not None
    tree = cache / deb.name.removesuffix(".deb")
    if not (tree / ".ready").exists():
        _extract(deb, tree)
    version = next((tree / "lib" / "modules").iterdir()).name
    modules = tree / "lib" / "modules" / version
    image = _initramfs(modules)  # small and quick to build; cached by content
    initramfs = tree / f"initramfs-{hashlib.sha256(image).hexdigest()[:12]}.cpio"
    if not initramfs.exists():
        tmp = initramfs.with_suffix(".tmp")
        tmp.write_bytes(image)
        tmp.rename(initramfs)
    vmlinux = tree / "vmlinux"
    return Assets(version, vmlinux if vmlinux.exists() else _bzimage(tree), modules, initramfs)


def _bzimage(tree: Path) -> Path:
    return next((tree / "boot").glob("vmlinuz-*"))


def _extract(deb: Path, tree: Path) -> None:
    """dpkg -x into a temporary dir, depmod, unpack vmlinux; then rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=tree.parent))
    try:
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True, capture_output=True)
        version = next((tmp / "lib" / "modules").iterdir()).name
        subprocess.run(["depmod", "-b", str(tmp), version], check=True, capture_output=True)
        vmlinux = _vmlinux(_bzimage(tmp).read_bytes())
        if vmlinux:
            (tmp / "vmlinux").write_bytes(vmlinux)
        (tmp / ".ready").touch()
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside an xz-compressed bzImage (None if it is not one)."""
    at = bzimage.find(b"\xfd7zXZ\x00")
    if at < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[at:])
    except lzma.LZMAError:
        return None
    return elf if elf[:4] == b"\x7fELF" else None


def _boot_modules(modules: Path) -> list[str]:
    """Paths (relative to modules) of BOOT_MODULES and their dependencies, in load order."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    order: list[str] = []

    def add(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps[mod]):  # modules.dep lists the deepest last
            add(dep)
        order.append(mod)

    for name in BOOT_MODULES:
        if name in by_name:  # built into this kernel otherwise
            add(by_name[name])
    return order


def _initramfs(modules: Path) -> bytes:
    """A newc cpio: busybox, the 9p modules, /init."""
    order = _boot_modules(modules)
    init = INIT.replace("@WRITABLE@", " ".join(WRITABLE)).replace("@OUT@", OUT)
    init = init.replace("@TREE@", str(modules.parent.parent.parent))
    stage2 = STAGE2.replace("@OUT@", OUT)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "mods", "lib", "lib/modules", "sbin"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes())
    cpio.add("init", stat.S_IFREG | 0o755, init.encode())
    cpio.add("stage2", stat.S_IFREG | 0o644, stage2.encode())
    for mod in order:
        cpio.add(f"mods/{Path(mod).name}", stat.S_IFREG | 0o644, (modules / mod).read_bytes())
    cpio.add(
        "mods/order", stat.S_IFREG | 0o644, "".join(Path(m).name + "\n" for m in order).encode()
    )
    return cpio.finish()


class _Cpio:
    """Writes the newc format the kernel unpacks."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + name.encode() + b"\0"
        self.parts += [_pad(head), _pad(data)]

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def qemu_argv(
    assets: Assets, out: Path, memory: str, cpus: int, share: Path | None = None
) -> list[str]:
    """qemu under TCG, no network device, the host's / read-only and `out` writable; `share`
    (read-only) is mounted at its own path again, over the guest's tmpfs dirs."""
    root = "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap"
    append = "console=ttyS0 panic=-1 rdinit=/init loglevel=4 tsc=reliable"
    extra: list[str] = []
    if share is not None:
        if any(c.isspace() or c in ",\\'\"" for c in str(share)):
            raise LabError(f"cannot share {share} with the VM: whitespace or quotes in the path")
        append += f" migrate_share={share}"
        extra = ["-virtfs", f"local,path={share},mount_tag=share,security_model=none,"
                            "readonly=on,multidevs=remap"]  # fmt: skip
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", memory, "-smp", str(cpus),
        "-M", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
        "-no-reboot", "-serial", "stdio",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initramfs),
        "-append", append,
        "-virtfs", root,
        "-virtfs", f"local,path={out},mount_tag=out,security_model=none",
        *extra,
    ]  # fmt: skip


@dataclass
class Machine:
    """One VM run at a time; close() kills a qemu still running (by its pid) and removes the
    results share unless it was given (`keep`). For test fixtures' finalizers."""

    memory: str = "2G"
    cpus: int = 2
    keep: Path | None = None
    share: Path | None = None  # e.g. the checkout under test, wherever it is
    proc: subprocess.Popen[bytes] | None = None

    def run(self, script: str, timeout: float = 600, env: dict[str, str] | None = None) -> Result:
        """Boot, run `script` (sh) as root in the guest, power off: its exit code and output.
        Files the script writes to $VM_OUT stay in `keep` (if given)."""
        assets = prepare()
        out = self.out = self.keep or Path(tempfile.mkdtemp(prefix="migrate-vm-"))
        out.mkdir(parents=True, exist_ok=True)
        for f in ("rc", "output"):
            (out / f).unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), **(env or {})}  # the host's tools, the same
        exports = "".join(f"export {k}={_shq(v)}\n" for k, v in env.items())
        (out / "cmd.sh").write_text(exports + script)
        t0 = time.monotonic()
        argv = qemu_argv(assets, out, self.memory, self.cpus, self.share)
        self.proc = proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            raw, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raw, _ = proc.communicate()
            raise LabError(f"VM timed out after {timeout:.0f}s: {_tail(raw.decode())}") from None
        finally:
            self.kill()
        console = raw.decode(errors="replace")
        try:
            rc_text = (out / "rc").read_text().strip()
            output = (out / "output").read_text(errors="replace")
        except FileNotFoundError:
            raise LabError(f"VM ended without a result (qemu exit {proc.returncode}): "
                           f"{_tail(console)}") from None  # fmt: skip
        code = int(rc_text) if rc_text.lstrip("-").isdigit() else -1
        return Result(code, output, console, time.monotonic() - t0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self.keep is None and getattr(self, "out", None):
            shutil.rmtree(self.out, ignore_errors=True)


def run(
    script: str,
    timeout: float = 600,
    memory: str = "2G",
    cpus: int = 2,
    env: dict[str, str] | None = None,
    keep: Path | None = None,
) -> Result:
    """Machine(...).run(...), and close it whatever happens."""
    machine = Machine(memory, cpus, keep)
    try:
        return machine.run(script, timeout, env)
    finally:
        machine.close()


def _shq(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "no console output"


def main(argv: list[str]) -> int:
    """scripts/vm-run CMD...: run CMD in the VM, from the same directory; its output and exit
    code. VM_MEMORY, VM_CPUS, VM_TIMEOUT in the environment override the defaults."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vm-run CMD [ARGS...]   (root; runs CMD in a soft-dirty qemu VM)")
        return 2
    script = f"cd {shlex.quote(os.getcwd())} || exit 125\nexec {shlex.join(argv)}\n"
    env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    try:
        r = run(
            script,
            timeout=float(os.environ.get("VM_TIMEOUT", "900")),
            memory=os.environ.get("VM_MEMORY", "2G"),
            cpus=int(os.environ.get("VM_CPUS", "2")),
            env=env,
        )
    except LabError as e:
        print(f"vm-run: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(r.output)
    print(f"vm-run: exit {r.exit_code} after {r.seconds:.1f}s", file=sys.stderr)
    return r.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
