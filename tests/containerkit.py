"""Containers of three runtimes (LXC, runc, Podman) for the lab tests: busybox containers built
offline from busybox-static, their fixtures (registered in tests/conftest.py) and helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.labkit import on, wait_for

BUSYBOX = "/bin/busybox"  # Debian's busybox-static
IMAGE = "localhost/migrate-busybox:1"
# Counts in memory; writes the count to a tmpfs of the container (dumped with it by CRIU).
COUNTER = 'n=0; while :; do n=$((n+1)); echo $n > "$1/count"; sleep 0.05; done\n'
PODMAN = ["podman", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
# An offline LXC busybox container as this kernel takes it: no tty (lxc.tty.max = 0), no
# AppArmor line (no AppArmor here), no ro bind mounts of the host's libraries (busybox is
# static; CRIU could not restore them), and an init that only runs the counter (the
# template's rcS would run a DHCP client, which drops a configured address).
_LXC_CREATE = r"""
name=$1 conf=$2
lxc-create -n "$name" -f "$conf" -t busybox >/dev/null
d=/var/lib/lxc/$name
sed -i -e '/^lxc.tty.max/d' -e '/^lxc.apparmor/d' -e '/^lxc.mount.entry = \/\(usr\/\)\?lib/d' \
  "$d/config"
echo 'lxc.tty.max = 0' >> "$d/config"
printf '::respawn:/bin/sh /counter.sh /dev/shm\n' > "$d/rootfs/etc/inittab"
cp "$3" "$d/rootfs/counter.sh"
lxc-start -n "$name"
"""


LXC_ADDRESS, LXC_MAC, LXC_VETH = "198.18.0.71", "02:6d:67:00:07:01", "vlxcmig"
LXC_NET = f"""lxc.net.0.type = veth
lxc.net.0.link = br0
lxc.net.0.flags = up
lxc.net.0.hwaddr = {LXC_MAC}
lxc.net.0.veth.pair = {LXC_VETH}
lxc.net.0.ipv4.address = {LXC_ADDRESS}/24
"""


@pytest.fixture(scope="session")
def rootfs() -> Iterator[Path]:
    """A busybox rootfs with the counter, a tarball of it (Podman's image) and a runc bundle
    config for it (built once)."""
    if not Path(BUSYBOX).exists():
        pytest.fail(f"{BUSYBOX} is missing: apt-get install busybox-static (make test-deps)")
    base = Path(tempfile.mkdtemp(prefix="migrate-rootfs-", dir="/run"))
    try:
        root = base / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
        for applet in applets.stdout.split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        for d in ("proc", "sys", "dev", "tmp", "data"):
            (root / d).mkdir()
        (root / "counter.sh").write_text(COUNTER)
        subprocess.run(["tar", "-C", str(root), "-cf", str(base / "rootfs.tar"), "."], check=True)
        # runc's bundle config: no terminal (stdio /dev/null), a writable root, the counter.
        subprocess.run(["runc", "spec", "--bundle", str(base)], check=True)
        spec = json.loads((base / "config.json").read_text())
        spec["process"].update(terminal=False, args=["sh", "/counter.sh", "/dev/shm"])
        spec["root"]["readonly"] = False
        (base / "config.json").write_text(json.dumps(spec))
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Container:
    """One test container, seen through its runtime's own tools inside the lab hosts."""

    lab: labmod.Lab
    runtime: str
    name: str
    count_dir: str  # a tmpfs inside the container

    def pid(self, host: str) -> int:
        """The container's init pid if its runtime shows it running on host, else 0."""
        if self.runtime == "runc":
            out = on(self.lab, host, 'runc state "$1" 2>/dev/null || true', self.name)
            state = json.loads(out) if out.strip() else {}
            return int(state["pid"]) if state.get("status") == "running" else 0
        if self.runtime == "lxc":
            out = on(self.lab, host, 'lxc-info -n "$1" -s -p 2>/dev/null || true', self.name)
            info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
            running = info.get("State", "").strip() == "RUNNING"
            return int(info["PID"]) if running else 0
        out = on(self.lab, host, '"$@" ps --format "{{.Names}} {{.Pid}}" || true', *PODMAN)
        pids = dict(line.split() for line in out.splitlines() if line.strip())
        return int(pids.get(self.name, 0))

    def exists(self, host: str) -> bool:
        """Whether host's runtime knows the container at all (running or not)."""
        script = {
            "runc": 'runc state "$1"',
            "lxc": 'lxc-info -n "$1" -s | grep -qv STOPPED',
            "podman": 'n=$1; shift; "$@" container exists "$n"',
        }[self.runtime]
        args = [self.name, *PODMAN] if self.runtime == "podman" else [self.name]
        return bool(on(self.lab, host, f"{script} >/dev/null 2>&1 && echo yes", *args,
                       check=False).strip())  # fmt: skip

    def count(self, host: str) -> int:
        pid = self.pid(host)
        assert pid, f"{self.runtime} container {self.name} is not running on {host}"
        text = on(self.lab, host, 'cat "/proc/$1/root$2/count"', str(pid), self.count_dir)
        return int(text.strip() or 0)

    def remove(self, host: str) -> None:
        script = {
            "runc": 'runc delete -f "$1"; rm -rf "/srv/$1"',
            "lxc": 'lxc-stop -k -n "$1"; lxc-destroy -n "$1"',
            "podman": 'n=$1; shift; "$@" rm -f -i "$n"',
        }[self.runtime]
        args = [self.name, *PODMAN] if self.runtime == "podman" else [self.name]
        on(self.lab, host, f"{{ {script}; }} >/dev/null 2>&1", *args, check=False)


@pytest.fixture(scope="session")
def podman_image(lab: labmod.Lab, rootfs: Path) -> Iterator[str]:
    """The busybox image on host-a and host-b (not host-c: a destination without it)."""
    for host in ("host-a", "host-b"):
        on(lab, host, '"$@" >/dev/null', *PODMAN, "import", str(rootfs / "rootfs.tar"), IMAGE)
    yield IMAGE
    for host in ("host-a", "host-b"):
        if lab.host(host).sshd_pid:
            on(lab, host, '"$@" >/dev/null 2>&1', *PODMAN, "rmi", "-f", IMAGE, check=False)


@pytest.fixture
def container(
    request: pytest.FixtureRequest, lab: labmod.Lab, rootfs: Path, tmp_path: Path
) -> Iterator[Container]:
    """A counting container of runtime request.param on host-a; removed from every host."""
    runtime: str = request.param.removesuffix("-net")  # lxc-net: LXC with a veth into br0
    name = f"{runtime}-{request.node.name.split('[')[0].removeprefix('test_')[:20]}"
    ctr = Container(lab, runtime, name, "/data" if runtime == "podman" else "/dev/shm")
    for host in lab.names:
        ctr.remove(host)
    try:
        start(ctr, rootfs, tmp_path, request)
        wait_for(lambda: ctr.pid("host-a") and ctr.count("host-a") >= 20, timeout=20,
                 what=f"{runtime} container to count")  # fmt: skip
        yield ctr
    finally:
        for host in lab.names:
            if lab.host(host).sshd_pid:
                ctr.remove(host)


def start(ctr: Container, rootfs: Path, tmp: Path, request: pytest.FixtureRequest) -> None:
    lab, name = ctr.lab, ctr.name
    if ctr.runtime == "runc":
        on(lab, "host-a", 'mkdir -p "/srv/$1" && cp -a "$2/rootfs" "$2/config.json" "/srv/$1/"',
           name, str(rootfs))  # fmt: skip
        on(lab, "host-a", 'cd "/srv/$1" && runc run -d "$1" </dev/null >/dev/null 2>&1', name)
    elif ctr.runtime == "lxc":
        conf = tmp / "lxc.conf"
        conf.write_text(LXC_NET if request.param == "lxc-net" else "lxc.net.0.type = empty\n")
        on(lab, "host-a", _LXC_CREATE, name, str(conf), str(rootfs / "rootfs" / "counter.sh"))
    else:
        request.getfixturevalue("podman_image")
        on(lab, "host-a", 'n=$1; shift; "$@" >/dev/null', name, *PODMAN, "run", "-d",
           "--name", name, "--runtime", "runc", "--network", "none", "--tmpfs", ctr.count_dir,
           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", IMAGE,
           "sh", "/counter.sh", ctr.count_dir)  # fmt: skip


def workload_config(lab: labmod.Lab, path: Path, ctr: Container, base: Path | None = None) -> Path:
    """The lab's config (or base) with one workload: the container."""
    config = yaml.safe_load((base or lab.config_path).read_text())
    config["workloads"] = {ctr.name: {"runtime": ctr.runtime, "container": ctr.name}}
    path.write_text(yaml.safe_dump(config))
    return path


RUNTIMES = ["lxc", "runc", "podman"]


# A container exactly as `lxc-create -t busybox` makes it from a config that includes the
# distribution's common.conf (ttys, lxc.tty.dir = lxc, console, pty.max) and a veth: nothing
# of its config is changed. Its rcS only runs the counter instead of a DHCP client (there is no
# DHCP server here; the client would drop the configured address). With `common` the
# template's `lxc.pty.max = 1` goes, so common.conf's 1024 holds.
_LXC_STOCK = r"""
name=$1 conf=$2 pty=$3 counter=$4
lxc-create -n "$name" -f "$conf" -t busybox >/dev/null
d=/var/lib/lxc/$name
[ "$pty" = common ] && sed -i '/^lxc.pty.max = 1$/d' "$d/config"
sed -i "s|^/bin/udhcpc|/bin/sh /counter.sh /dev/shm \&|" "$d/rootfs/etc/init.d/rcS"
cp "$counter" "$d/rootfs/counter.sh"
lxc-start -n "$name" </dev/null >/dev/null 2>&1
"""
STOCK_ADDRESS, STOCK_MAC, STOCK_VETH = "198.18.0.73", "02:6d:67:00:07:03", "vlxcstock"
_STOCK_NET = LXC_NET.replace(LXC_MAC, STOCK_MAC).replace(LXC_VETH, STOCK_VETH)
STOCK_CONF = "lxc.include = /usr/share/lxc/config/common.conf\n" + _STOCK_NET.replace(
    LXC_ADDRESS, STOCK_ADDRESS
)


@pytest.fixture
def stock_lxc(
    request: pytest.FixtureRequest, lab: labmod.Lab, rootfs: Path, tmp_path: Path
) -> Iterator[Container]:
    """A template-made LXC container (request.param: "template" or "common" pty.max) on
    host-a, counting; removed from every host (its veth gone) at the end."""
    ctr = Container(lab, "lxc", f"stock-{request.param}", "/dev/shm")
    for host in lab.names:
        ctr.remove(host)
    conf = tmp_path / "lxc.conf"
    conf.write_text(STOCK_CONF)
    try:
        on(lab, "host-a", _LXC_STOCK, ctr.name, str(conf), request.param,
           str(rootfs / "rootfs" / "counter.sh"))  # fmt: skip
        wait_for(lambda: ctr.pid("host-a") and ctr.count("host-a") >= 20, timeout=20,
                 what="the stock container to count")  # fmt: skip
        yield ctr
    finally:
        for host in lab.names:
            if lab.host(host).sshd_pid:
                ctr.remove(host)
        for host in lab.names:
            if lab.host(host).sshd_pid:
                wait_for(lambda h=host: STOCK_VETH not in on(lab, h, "ip -o link show"),
                         what=f"{STOCK_VETH} gone from {host}")  # fmt: skip
