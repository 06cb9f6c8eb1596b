"""The local lab for real: network namespaces, one sshd per host, the written migrate.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod
from orchestrator.lab import Lab, LabError
from orchestrator.lab.proc import start_time
from orchestrator.lab.state import PID_STRIDE
from tests.labkit import other_lab_up

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]


def _new_dir() -> Path:
    # Below /run, so sshd keeps StrictModes on (a lab below /tmp is tested on its own).
    return Path(tempfile.mkdtemp(prefix="migrate-lab-test-", dir="/run"))


@pytest.fixture(scope="module")
def lab_dir() -> Iterator[Path]:
    d = _new_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _no_other_lab() -> None:
    # Lab names and addresses are machine-wide: e.g. conftest's session lab, if a test that
    # uses it ran first, is still up. Say so rather than fail on the clash.
    if other_lab_up():
        pytest.skip("another lab is up on this machine (migbr0 exists): run this module alone")


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, lab_dir: Path) -> Lab:
    _no_other_lab()
    # Registered before up(): a half-failed up() is cleaned up too.
    request.addfinalizer(lambda: labmod.down(lab_dir))
    return labmod.up(lab_dir, hosts=2)


@pytest.fixture(scope="module")
def cfg(lab: Lab) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(lab.config_path.read_text())
    return data


def ssh_argv(key: str, known_hosts: str, user: str, address: str, port: int, cmd: str) -> list[str]:
    return [
        "ssh", "-i", key, "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-p", str(port), f"{user}@{address}", cmd,
    ]  # fmt: skip


def ssh(cfg: dict[str, Any], host: str, cmd: str) -> str:
    """Run cmd on host from the root namespace with plain OpenSSH and the config's files."""
    h = cfg["hosts"][host]
    argv = ssh_argv(h["key"], h["known_hosts"], h["user"], h["address"], h["port"], cmd)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"ssh {host} {cmd!r}: {res.stderr}"
    return res.stdout.strip()


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def test_config_written_like_the_example(lab: Lab, cfg: dict[str, Any]) -> None:
    assert set(cfg) == {"state_dir", "hosts", "workloads", "policy"}
    assert cfg["state_dir"] == str(lab.dir / "state") and (lab.dir / "state").is_dir()
    assert cfg["workloads"] == {}
    assert set(cfg["policy"]) == {"connect_timeout", "command_timeout", "retries", "retry_deadline"}
    assert list(cfg["hosts"]) == ["host-a", "host-b"]
    key = str(lab.dir / "client" / "id_ed25519")
    kh = str(lab.dir / "client" / "known_hosts")
    for i, (name, h) in enumerate(cfg["hosts"].items()):
        assert h == {
            "address": f"198.18.0.{i + 1}", "port": 22, "user": "root", "key": key,
            "known_hosts": kh, "workdir": str(lab.dir / "hosts" / name / "work"), "criu": "criu",
            "rsync_key": key, "rsync_known_hosts": kh,
        }  # fmt: skip
        assert Path(h["workdir"]).is_dir()
    assert os.stat(key).st_mode & 0o777 == 0o600
    # known_hosts holds each host's real generated key, nothing else.
    expected = []
    for h in lab.hosts:
        typ, b64 = h.host_key_pub.read_text().split()[:2]
        expected.append(f"{h.address} {typ} {b64}")
    assert Path(kh).read_text().splitlines() == expected


def test_ssh_to_every_host_with_strict_host_keys(cfg: dict[str, Any]) -> None:
    names = {host: ssh(cfg, host, "uname -n") for host in cfg["hosts"]}
    assert names == {"host-a": "host-a", "host-b": "host-b"}


def test_wrong_host_key_is_refused(lab: Lab, cfg: dict[str, Any], tmp_path: Path) -> None:
    # Swap the two hosts' keys: strict checking must refuse the connection.
    lines = lab.known_hosts.read_text().splitlines()
    a, b = (line.split(" ", 1) for line in lines)
    bad = tmp_path / "known_hosts"
    bad.write_text(f"{a[0]} {b[1]}\n{b[0]} {a[1]}\n")
    h = cfg["hosts"]["host-a"]
    argv = ssh_argv(h["key"], str(bad), "root", h["address"], 22, "true")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in res.stderr


def test_hosts_have_their_own_namespaces(lab: Lab, cfg: dict[str, Any]) -> None:
    kinds = ("net", "pid", "mnt", "uts")
    mine = {k: os.readlink(f"/proc/self/ns/{k}") for k in kinds}
    seen: dict[str, set[str]] = {k: {mine[k]} for k in kinds}
    for h in lab.hosts:
        out = ssh(cfg, h.name, "readlink " + " ".join(f"/proc/self/ns/{k}" for k in kinds))
        theirs = dict(zip(kinds, out.split(), strict=True))
        for k in kinds:
            assert theirs[k] not in seen[k], f"{h.name} shares its {k} namespace"
            seen[k].add(theirs[k])
        assert theirs["net"] == f"net:[{h.ns_inode('net')}]"
        assert os.stat(f"/run/netns/{h.netns}").st_ino == h.ns_inode("net")
        # sshd is the host's pid 1.
        assert "sshd" in ssh(cfg, h.name, "cat /proc/1/comm")


def test_pid_ranges_are_separate(cfg: dict[str, Any]) -> None:
    a = int(ssh(cfg, "host-a", "echo $$"))
    b = int(ssh(cfg, "host-b", "echo $$"))
    assert PID_STRIDE < a < 2 * PID_STRIDE
    assert b > 2 * PID_STRIDE


def test_session_path_has_usr_local_sbin(cfg: dict[str, Any]) -> None:
    # sshd's own PATH for root (before any shell rc file adds to it).
    env = ssh(cfg, "host-a", "tr '\\0' '\\n' < /proc/$$/environ")
    path = next(line for line in env.splitlines() if line.startswith("PATH="))
    assert "/usr/local/sbin" in path[5:].split(":")


def test_host_a_reaches_host_b_like_rsync(lab: Lab, cfg: dict[str, Any]) -> None:
    a, b = cfg["hosts"]["host-a"], cfg["hosts"]["host-b"]
    inner = " ".join(ssh_argv(a["rsync_key"], a["rsync_known_hosts"], "root", b["address"], 22,
                              "uname -n"))  # fmt: skip
    assert ssh(cfg, "host-a", inner) == "host-b"
    # A real rsync push from a's workdir to b's over ssh, run on host-a.
    src = Path(a["workdir"]) / "push"
    src.mkdir()
    (src / "data").write_text("hello\n")
    rsh = f"ssh -i {a['rsync_key']} -o UserKnownHostsFile={a['rsync_known_hosts']} " \
          "-o StrictHostKeyChecking=yes -o BatchMode=yes"  # fmt: skip
    ssh(cfg, "host-a", f"rsync -a -e '{rsh}' {src}/ root@{b['address']}:{b['workdir']}/push/")
    assert (Path(b["workdir"]) / "push" / "data").read_text() == "hello\n"


def test_exec_argv_runs_inside_the_host(lab: Lab) -> None:
    argv = labmod.exec_argv(lab, "host-b", ["sh", "-c", "uname -n; echo $$; ip -br -4 addr"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "host-b"
    assert int(out[1]) > 2 * PID_STRIDE
    assert "198.18.0.2/24" in out[2] or "198.18.0.2/24" in "\n".join(out)
    with pytest.raises(LabError):
        labmod.exec_argv(lab, "host-z", ["true"])


def test_bridge_macs_are_pinned(lab: Lab) -> None:
    (root_br,) = ip_json("link", "show", "migbr0")
    assert root_br["address"] == "02:6d:67:00:00:fe"
    for h in lab.hosts:
        links = {link["ifname"]: link for link in ip_json("-n", h.netns, "link", "show")}
        mac = f"02:6d:67:00:00:{h.index + 1:02x}"
        assert links["br0"]["address"] == links["eth0"]["address"] == mac
        assert links["eth0"]["master"] == "br0"


def test_unreachable_route_held_while_up(lab: Lab) -> None:
    routes = ip_json("route", "show", "exact", "198.18.0.0/15")
    assert [r.get("type") for r in routes] == ["unreachable"]
    # Outside the lab's /24 nothing in 198.18.0.0/15 is routable from the root namespace.
    res = subprocess.run(["ip", "route", "get", "198.19.1.1"], capture_output=True, text=True)
    assert res.returncode != 0 or "unreachable" in res.stdout
    (route,) = ip_json("route", "get", "198.18.0.2")
    assert route["dev"] == "migbr0"


def test_status_load_and_idempotent_up(lab: Lab, lab_dir: Path) -> None:
    st = labmod.status(lab_dir)
    assert [(s.name, s.address, s.netns, s.alive) for s in st] == [
        ("host-a", "198.18.0.1", "mig-host-a", True),
        ("host-b", "198.18.0.2", "mig-host-b", True),
    ]
    assert labmod.load(lab_dir) == lab
    assert lab.strict_modes and "StrictModes yes" in lab.hosts[0].sshd_config.read_text()
    assert labmod.up(lab_dir, hosts=2) == lab
    with pytest.raises(LabError, match="already up"):
        labmod.up(lab_dir, hosts=3)
    # A second lab elsewhere would clash on names and addresses: refused, nothing left behind.
    other = _new_dir()
    try:
        with pytest.raises(LabError, match="migbr0"):
            labmod.up(other, hosts=2)
        assert list(other.iterdir()) == []
    finally:
        shutil.rmtree(other)
    assert all(s.alive for s in labmod.status(lab_dir))


def _try_ssh(lab: Lab, cfg: dict[str, Any], src: str | None, dst: str) -> tuple[int, str, float]:
    """ssh to dst (from inside host src, or from the root namespace), ConnectTimeout 2:
    (exit code, stderr, seconds)."""
    h = cfg["hosts"][dst]
    argv = ssh_argv(h["key"], h["known_hosts"], "root", h["address"], 22, "uname -n")
    argv[argv.index("ConnectTimeout=5")] = "ConnectTimeout=2"
    if src is not None:
        argv = labmod.exec_argv(lab, src, argv)
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return res.returncode, res.stderr.strip(), time.monotonic() - t0


def test_cut_and_mend_link(lab: Lab, cfg: dict[str, Any]) -> None:
    assert _try_ssh(lab, cfg, "host-a", "host-b")[0] == 0
    labmod.cut_link(lab, "host-a", "host-b")  # drop: silence, both ways
    assert labmod.link_cut(lab, "host-a", "host-b") and labmod.link_cut(lab, "host-b", "host-a")
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a")):
        rc, err, secs = _try_ssh(lab, cfg, src, dst)
        assert rc != 0 and "timed out" in err and secs >= 1.5, (src, dst, err)
    # Only the link between them: the controller still reaches both.
    assert ssh(cfg, "host-a", "uname -n") == "host-a"
    assert ssh(cfg, "host-b", "uname -n") == "host-b"
    labmod.cut_link(lab, "host-a", "host-b", "reject")  # replaces the cut: refused at once
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a")):
        rc, err, secs = _try_ssh(lab, cfg, src, dst)
        assert rc != 0 and "refused" in err and secs < 1.5, (src, dst, err)
    with pytest.raises(LabError, match="cut mode"):
        labmod.cut_link(lab, "host-a", "host-b", "sever")
    labmod.mend_link(lab, "host-b", "host-a")  # either order
    assert not labmod.link_cut(lab, "host-a", "host-b")
    assert _try_ssh(lab, cfg, "host-a", "host-b")[:2] == (0, "")
    assert _try_ssh(lab, cfg, "host-b", "host-a")[0] == 0
    labmod.mend_link(lab, "host-a", "host-b")  # mending a whole link: nothing happens


@pytest.mark.parametrize("silent", [False, True], ids=["crash", "power-loss"])
def test_kill_and_revive_host(lab: Lab, lab_dir: Path, cfg: dict[str, Any], silent: bool) -> None:
    ssh(cfg, "host-b", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    h = lab.host("host-b")
    old_pid, pid_ns = h.sshd_pid, h.ns_inode("pid")
    labmod.kill_host(lab, "host-b", silent=silent)
    # The whole host is gone at once: its sshd and everything in its pid namespace.
    assert not labmod.host_up(lab, "host-b") and labmod.host_up(lab, "host-a")
    assert [s.alive for s in labmod.status(lab_dir)] == [True, False]
    assert _procs_in_pid_ns(pid_ns) == []
    rc, err, secs = _try_ssh(lab, cfg, None, "host-b")
    if silent:  # nothing answers: only a timeout tells
        assert rc != 0 and "timed out" in err and secs >= 1.5, err
    else:  # its network stack still answers for it
        assert rc != 0 and "refused" in err and secs < 1.5, err
    with pytest.raises(LabError, match="already down"):
        labmod.kill_host(lab, "host-b")
    with pytest.raises(LabError, match="not running"):
        labmod.exec_argv(lab, "host-b", ["true"])

    labmod.revive_host(lab, "host-b")
    assert labmod.host_up(lab, "host-b") and h.sshd_pid != old_pid
    assert [s.alive for s in labmod.status(lab_dir)] == [True, True]
    # Same address and host key (strict checking passes), a fresh pid namespace: a reboot.
    assert ssh(cfg, "host-b", "uname -n; cat /proc/1/comm").split() == ["host-b", "sshd"]
    assert int(ssh(cfg, "host-b", "echo $$")) > 2 * PID_STRIDE
    assert ssh(cfg, "host-b", "pgrep -x sleep || echo none") == "none"
    assert _try_ssh(lab, cfg, "host-a", "host-b")[0] == 0
    # Recorded in the state file, so down() removes the new sshd (test_down_... checks it).
    assert labmod.load(lab_dir) == lab
    assert ["proc", h.sshd_pid, h.sshd_start, "sshd host-b"] in labmod.load(lab_dir).made
    labmod.revive_host(lab, "host-b")  # a host that is up is left alone
    assert labmod.load(lab_dir).host("host-b").sshd_pid == h.sshd_pid


def _assert_gone(lab: Lab) -> None:
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith("mig-host-")]
    links = {link["ifname"] for link in ip_json("link", "show")}
    assert not {n for n in links if n == "migbr0" or n.startswith("migv-")}
    assert ip_json("route", "show", "exact", "198.18.0.0/15") == []
    for h in lab.hosts:
        assert start_time(h.sshd_pid) != h.sshd_start  # that sshd (pid 1 of the host) is gone
    assert not (lab.dir / "lab.json").exists()


def _procs_in_pid_ns(inode: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/pid").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def test_down_removes_everything_and_twice_is_fine(
    lab: Lab, lab_dir: Path, cfg: dict[str, Any]
) -> None:
    # A daemon left running on host-a must die with the host.
    ssh(cfg, "host-a", "setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    pid_ns = lab.host("host-a").ns_inode("pid")
    assert len(_procs_in_pid_ns(pid_ns)) >= 2  # sshd + sleep
    labmod.down(lab_dir)
    _assert_gone(lab)
    assert _procs_in_pid_ns(pid_ns) == []
    assert not (lab_dir / "hosts").exists() and not lab.config_path.exists()
    labmod.down(lab_dir)
    with pytest.raises(LabError, match="no lab is up"):
        labmod.load(lab_dir)
    with pytest.raises(LabError, match="no lab is up"):
        labmod.status(lab_dir)


def test_lab_below_tmp_and_down_when_pieces_are_already_gone() -> None:
    _no_other_lab()
    # Below /tmp (world-writable, sticky) sshd needs StrictModes off: the lab does that itself.
    d = Path(tempfile.mkdtemp(prefix="migrate-lab-test-")) / "lab"
    try:
        lab = labmod.up(d, hosts=1)
        (h,) = lab.hosts
        assert not lab.strict_modes and "StrictModes no" in h.sshd_config.read_text()
        cfg = yaml.safe_load(lab.config_path.read_text())
        assert ssh(cfg, "host-a", "uname -n") == "host-a"
        os.kill(h.sshd_pid, 9)  # a host "crash"
        subprocess.run(["ip", "netns", "del", h.netns], check=True)
        assert [s.alive for s in labmod.status(d)] == [False]
        with pytest.raises(LabError, match="host-a is down"):
            labmod.up(d, hosts=1)
        labmod.down(d)
        _assert_gone(lab)
        assert not d.exists()  # up() made it, down() removed it
    finally:
        labmod.down(d)
        shutil.rmtree(d.parent, ignore_errors=True)


def test_failed_up_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_other_lab()

    def broken(*_: object, **__: object) -> None:
        raise LabError("injected failure")

    # Fails after networking and sshds are up: everything made so far must go.
    monkeypatch.setattr("orchestrator.lab.sshd.wait_listening", broken)
    d = _new_dir()
    try:
        with pytest.raises(LabError, match="injected failure"):
            labmod.up(d, hosts=2)
        assert list(d.iterdir()) == []
        links = {link["ifname"] for link in ip_json("link", "show")}
        assert "migbr0" not in links and "migv-a" not in links
        assert ip_json("route", "show", "exact", "198.18.0.0/15") == []
        assert not os.path.exists("/run/netns/mig-host-a")
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(d) not in out
    finally:
        labmod.down(d)
        shutil.rmtree(d, ignore_errors=True)


def test_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keys below a dir others can write to (and not sticky like /tmp): refused, nothing made.
    loose = _new_dir()
    try:
        os.chmod(loose, 0o777)
        with pytest.raises(LabError, match="writable by others"):
            labmod.up(loose / "lab", hosts=2)
        assert list(loose.iterdir()) == []
    finally:
        shutil.rmtree(loose)
    with pytest.raises(LabError, match="hosts must be"):
        labmod.up(Path("/run/migrate-lab-nope"), hosts=0)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        labmod.up(Path("/run/migrate-lab-nope"))
    with pytest.raises(LabError, match="needs root"):
        labmod.down(Path("/run/migrate-lab-nope"))
