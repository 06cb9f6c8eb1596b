"""Containers of three runtimes (LXC, runc, Podman) move between lab hosts with their runtime's
own checkpoint/restore: real busybox containers, built here offline from busybox-static."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.labkit import failing_restore_config, migrate, on, wait_for

pytestmark = pytest.mark.lab

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


@pytest.mark.parametrize("container", RUNTIMES, indirect=True)
def test_container_moves_and_keeps_counting(
    lab: labmod.Lab, container: Container, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    ctr = container
    before = ctr.count("host-a")
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr)
    r = migrate("run", ctr.name, "host-a", "host-b", "--json", config=cfg)
    report = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["status"] == "succeeded"
    # It runs on host-b as its runtime sees it, the pid the report names.
    pid = ctr.pid("host-b")
    assert pid and pid == report["restored_pid"]
    # It kept its in-memory state: counting on from where it was, not from zero.
    after = ctr.count("host-b")
    assert after >= before
    wait_for(lambda: ctr.count("host-b") > after + 5, what="the counter to go on on host-b")
    # Gone from host-a (an LXC container stays defined there, stopped).
    assert ctr.pid("host-a") == 0 and not ctr.exists("host-a")
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob("*")), host.name
    dump = next(p["seconds"] for p in report["phases"] if p["name"] == "dump")
    sent = report["bytes_transferred"]
    record_property(
        "measured", f"{ctr.runtime}: freeze {report['downtime_ms']} ms (dump {dump:.2f}s), {sent} B"
    )


@pytest.mark.parametrize("container", RUNTIMES, indirect=True)
def test_failed_restore_keeps_the_container_on_the_source(
    lab: labmod.Lab, container: Container, tmp_path: Path
) -> None:
    ctr = container
    broken = failing_restore_config(lab, tmp_path)
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr, base=broken)
    before = ctr.count("host-a")
    r = migrate("run", ctr.name, "host-a", "host-b", "--json", config=cfg)
    report = json.loads(r.stdout)
    assert r.returncode == 3, r.stdout + r.stderr
    assert report["status"] == "rolled_back"
    assert "restore" in report["error"] and "host-b" in report["error"]
    # Running on host-a as its runtime sees it, state intact; nothing left on host-b.
    assert ctr.pid("host-a")
    now = ctr.count("host-a")
    assert now >= before
    wait_for(lambda: ctr.count("host-a") > now + 5, what="the counter to go on on host-a")
    assert ctr.pid("host-b") == 0 and not ctr.exists("host-b")
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob("*")), host.name
    # What travelled with the images (runc's bundle, LXC's container dir) is gone from host-b.
    copied = {"runc": f"/srv/{ctr.name}", "lxc": f"/var/lib/lxc/{ctr.name}"}.get(ctr.runtime)
    if copied:
        assert on(lab, "host-a", 'test -e "$1" && echo yes', copied).strip() == "yes"
        assert on(lab, "host-b", 'test -e "$1" || echo gone', copied).strip() == "gone"


@pytest.mark.parametrize("container", ["podman"], indirect=True)
def test_podman_needs_the_base_image_on_the_destination(
    lab: labmod.Lab, container: Container, tmp_path: Path
) -> None:
    cfg = workload_config(lab, tmp_path / "migrate.yaml", container)
    r = migrate("run", container.name, "host-a", "host-c", "--json", config=cfg)
    report = json.loads(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"podman image {IMAGE}" in report["error"] and "not on host-c" in report["error"]
    assert report["phases"][-1]["name"] == "preflight"
    assert container.pid("host-a")


@pytest.mark.parametrize("container", ["runc"], indirect=True)
def test_preflight_refusals(lab: labmod.Lab, container: Container, tmp_path: Path) -> None:
    """Missing container, a name taken on the destination, a strategy the runtime cannot do:
    one clear line each, before anything is frozen."""
    cfg = workload_config(lab, tmp_path / "migrate.yaml", container)
    ghost = yaml.safe_load(cfg.read_text())
    ghost["workloads"]["ghost"] = {"runtime": "lxc", "container": "no-such-ctr"}
    ghost_cfg = tmp_path / "ghost.yaml"
    ghost_cfg.write_text(yaml.safe_dump(ghost))
    r = migrate("run", "ghost", "host-a", "host-b", "--json", config=ghost_cfg)
    assert r.returncode == 1
    assert "lxc container no-such-ctr does not exist on host-a" in json.loads(r.stdout)["error"]

    r = migrate("run", container.name, "host-a", "host-b", "--strategy", "stream", "--json",
                config=cfg)  # fmt: skip
    assert r.returncode == 1
    assert "runc runtime cannot migrate with strategy stream" in json.loads(r.stdout)["error"]

    # The same bundle, run on host-b too (host-a's /srv, seen from outside the lab hosts).
    bundle_a = lab.host("host-a").home / "root" / "srv" / container.name
    on(lab, "host-b", 'mkdir -p "/srv/$1" && cp -a "$2/." "/srv/$1/"', container.name,
       str(bundle_a))  # fmt: skip
    on(lab, "host-b", 'cd "/srv/$1" && runc run -d "$1" </dev/null >/dev/null 2>&1', container.name)
    r = migrate("run", container.name, "host-a", "host-b", "--json", config=cfg)
    assert r.returncode == 1
    assert "already exists on host-b" in json.loads(r.stdout)["error"]
    assert container.pid("host-a")  # nothing was frozen


def arp_reply_mac(lab: labmod.Lab, host: str, address: str) -> str:
    """The MAC that answers an ARP request for address, asked from host ('' if none)."""
    out = on(lab, host, 'arping -c 2 -w 3 -I br0 "$1" || true', address)
    return next((w.strip("[]").lower() for w in out.split() if w.count(":") == 5), "")


@pytest.mark.parametrize("container", ["lxc-net"], indirect=True)
def test_lxc_veth_moves_with_its_mac_into_the_destination_bridge(
    lab: labmod.Lab, container: Container, tmp_path: Path
) -> None:
    ctr = container
    assert arp_reply_mac(lab, "host-c", LXC_ADDRESS) == LXC_MAC
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr)
    r = migrate("run", ctr.name, "host-a", "host-b", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    pid = ctr.pid("host-b")
    # The host end is in host-b's br0 under its configured name; the MAC inside is the same.
    assert "master br0" in on(lab, "host-b", 'ip -o link show dev "$1"', LXC_VETH)
    wait_for(lambda: LXC_VETH not in on(lab, "host-a", "ip -o link show"), what="veth gone")
    inside = on(lab, "host-b", 'nsenter -t "$1" -n ip -o link show dev eth0', str(pid))
    assert f"link/ether {LXC_MAC} " in inside
    # Its address answers from host-b now, with that MAC.
    assert arp_reply_mac(lab, "host-c", LXC_ADDRESS) == LXC_MAC
    wait_for(lambda: ctr.count("host-b") > 5, what="the counter to go on on host-b")


def run_until_phase(cfg: Path, name: str, phase: str) -> str:
    """Start a migration of name host-a -> host-b, SIGKILL the controller as `phase` begins
    (seen in its journal); the migration's id."""
    jdir = Path(yaml.safe_load(cfg.read_text())["state_dir"]) / "journal"
    jdir.mkdir(parents=True, exist_ok=True)
    before = set(jdir.glob("*.jsonl"))
    argv = [sys.executable, "-m", "orchestrator.cli", "run", name, "host-a", "host-b"]
    proc = subprocess.Popen([*argv, "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:

        def begun() -> str:
            for path in set(jdir.glob("*.jsonl")) - before:
                for line in path.read_text().splitlines():
                    e = json.loads(line)
                    if (e.get("event"), e.get("name"), e.get("state")) == ("phase", phase, "begin"):
                        return path.stem
            assert proc.poll() is None, f"the controller ended before {phase}"
            return ""

        return str(wait_for(begun, timeout=60, what=f"{phase} to begin"))
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("container", "phase", "expect"),
    [("lxc", "transfer", "rolled_back"), ("runc", "transfer", "rolled_back"),
     ("podman", "transfer", "rolled_back"), ("runc", "verify", "succeeded")],
    indirect=["container"],
)  # fmt: skip
def test_controller_killed_then_recover(
    lab: labmod.Lab, container: Container, tmp_path: Path, phase: str, expect: str
) -> None:
    """After the dump a runc or Podman source exists only as its images, an LXC one frozen:
    recover brings it back from them (or confirms the destination copy)."""
    ctr = container
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr)
    before = ctr.count("host-a")
    migration = run_until_phase(cfg, ctr.name, phase)
    r = migrate("recover", migration, "--json", config=cfg)
    report = json.loads(r.stdout)
    assert report["status"] == expect, r.stdout + r.stderr
    here, there = ("host-b", "host-a") if expect == "succeeded" else ("host-a", "host-b")
    assert ctr.pid(here) and not ctr.pid(there) and not ctr.exists(there)
    now = ctr.count(here)
    assert now >= before
    wait_for(lambda: ctr.count(here) > now + 5, what=f"the counter to go on on {here}")
    for host in lab.hosts:
        assert not list((host.workdir / "images").glob(f"*{migration}*")), host.name
