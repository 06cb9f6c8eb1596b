"""up / down / load / status / exec_argv: the lab's life cycle, driven by the state file."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from . import cgroups, netns, proc, sshd
from .state import (
    BRIDGE,
    CLIENT,
    CLIENT_ADDRESS,
    CLIENT_MAC,
    CLIENT_NETNS,
    CLIENT_VETH,
    DEFAULT_DIR,
    LAB_NET,
    MAX_HOSTS,
    PID_STRIDE,
    HostStatus,
    Lab,
    LabError,
    LabHost,
    host_address,
    host_name,
    netns_name,
    read,
    save,
    state_path,
    veth_name,
)

log = logging.getLogger(__name__)

POLICY = {"connect_timeout": 10, "command_timeout": 300, "retries": 3, "retry_deadline": 60}
_LOCK = ".lock"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, sshd): run it as root")


def _strict_modes_ok(lab_dir: Path) -> bool:
    """Whether sshd can keep StrictModes on for keys under lab_dir.

    StrictModes rejects authorized_keys below any group/world-writable directory (e.g. /tmp).
    A root-owned sticky one is still safe for us (nobody can rename our root-owned 0700 lab
    dir out of it): the lab then runs sshd with StrictModes off. Anything else is refused.
    """
    ok = True
    p = lab_dir
    while True:
        if p.exists():
            st = p.stat()
            loose = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if st.st_uid != 0 or (loose and (p == lab_dir or not st.st_mode & stat.S_ISVTX)):
                raise LabError(
                    f"lab dir {lab_dir}: {p} is not root's or is writable by others: "
                    "use a root-only directory such as /run/migrate-lab"
                )
            ok = ok and not loose
        if p == p.parent:
            return ok
        p = p.parent


@contextmanager
def _locked(lab_dir: Path, create: bool) -> Iterator[None]:
    """Serialise up/down on one lab dir (the lock file lives in it and goes with it)."""
    if not lab_dir.is_dir():
        if not create:
            yield
            return
        lab_dir.mkdir(mode=0o700, parents=True)
        os.chmod(lab_dir, 0o700)
        _make_marker(lab_dir)
    fd = os.open(lab_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_marker(lab_dir: Path) -> None:
    # A dir made by up() is removed by down(); remember that before any state exists.
    (lab_dir / ".made-by-lab").touch(mode=0o600)


def load(lab_dir: Path = DEFAULT_DIR) -> Lab:
    """The running lab recorded in lab_dir/lab.json; LabError if it is not (fully) up."""
    lab = read(lab_dir)
    if lab is None:
        raise LabError(f"no lab is up at {lab_dir} (run `migrate lab up`)")
    if not lab.complete:
        raise LabError(f"the lab at {lab_dir} is only half up: run `migrate lab down`, then up")
    return lab


def status(lab_dir: Path = DEFAULT_DIR) -> list[HostStatus]:
    """Per host: name, address, netns, sshd pid, and whether it is alive. LabError if not up."""
    lab = read(lab_dir)
    if lab is None:
        raise LabError(f"no lab is up at {lab_dir}")
    return [HostStatus(h.name, h.address, h.netns, h.sshd_pid, _alive(h)) for h in lab.hosts]


def _alive(h: LabHost) -> bool:
    return proc.is_same(h.sshd_pid, h.sshd_start) and netns.netns_exists(h.netns)


def exec_argv(lab: Lab, host: str, argv: list[str]) -> list[str]:
    """argv that runs ``argv`` inside host's net, mount, pid and UTS namespaces (those of its
    sshd pid 1), for subprocess. Its processes are then that host's: they die with it."""
    if host == CLIENT:  # a plain network namespace: no sshd, no pid namespace
        return ["ip", "netns", "exec", CLIENT_NETNS, *argv]
    h = lab.host(host)
    if not proc.is_same(h.sshd_pid, h.sshd_start):
        raise LabError(f"{host} is not running (its sshd pid {h.sshd_pid} is gone)")
    return ["nsenter", "-t", str(h.sshd_pid), "-n", "-m", "-p", "-u", "--", *argv]


def up(lab_dir: Path = DEFAULT_DIR, hosts: int = 2) -> Lab:
    """Bring up ``hosts`` lab hosts under lab_dir and write lab_dir/migrate.yaml.

    If the same lab is already up and healthy, return it; refuse any other existing lab.
    On failure, everything made so far is removed again (down()) before LabError is raised.
    """
    _require_root()
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
    lab_dir = Path(os.path.abspath(lab_dir))
    strict_modes = _strict_modes_ok(lab_dir)
    t0 = time.monotonic()
    with _locked(lab_dir, create=True):
        old = read(lab_dir)
        if old is not None:
            return _existing(old, hosts)
        try:
            _preflight(lab_dir, hosts)
        except LabError:
            _remove_dir_if_ours(lab_dir)
            raise
        lab = _new_lab(lab_dir, hosts)
        lab.strict_modes = strict_modes
        if not strict_modes:
            log.info("lab dir %s is below a world-writable dir: sshd StrictModes off", lab_dir)
        try:
            _build(lab)
        except BaseException as e:
            log.warning("lab up failed (%s): removing what was made", e)
            try:
                _teardown(lab)
            except LabError as e2:
                log.error("cleanup after failed up also failed: %s", e2)
            if isinstance(e, LabError | OSError):
                raise LabError(f"lab up failed, cleaned up: {e}") from e
            raise
    log.info("lab up: %d hosts in %.2fs", hosts, time.monotonic() - t0)
    return lab


def _existing(old: Lab, hosts: int) -> Lab:
    if not old.complete:
        raise LabError(f"a lab at {old.dir} is half up: run `migrate lab down` first")
    if len(old.hosts) != hosts:
        raise LabError(
            f"a lab with {len(old.hosts)} hosts is already up at {old.dir}: "
            "run `migrate lab down` first"
        )
    dead = [h.name for h in old.hosts if not _alive(h)]
    if dead:
        raise LabError(
            f"the lab at {old.dir} is up but {', '.join(dead)} is down: "
            "run `migrate lab down`, then up"
        )
    return old


def _preflight(lab_dir: Path, hosts: int) -> None:
    """Refuse before making anything: foreign files, missing tools, names or addresses in use."""
    extra = sorted(p.name for p in lab_dir.iterdir() if p.name not in (_LOCK, ".made-by-lab"))
    if extra:
        raise LabError(
            f"{lab_dir} holds files but no lab ({', '.join(extra[:3])}): "
            "use an empty or new directory"
        )
    for tool in ("ip", "ssh", "ssh-keygen", "unshare", "nsenter", sshd.SSHD):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: install iproute2, openssh and util-linux")
    clash = [BRIDGE] if netns.link_exists(BRIDGE) else []
    clash += [veth_name(i) for i in range(hosts) if netns.link_exists(veth_name(i))]
    clash += [f"netns {netns_name(i)}" for i in range(hosts) if netns.netns_exists(netns_name(i))]
    if clash:
        raise LabError(
            f"{', '.join(clash)} already exist(s) but belong to no lab here: another "
            "lab dir is up, or remove them by hand (ip link del / ip netns del)"
        )
    used = netns.root_addresses_in_lab_net()
    if used:
        raise LabError(f"198.18.0.0/15 is already in use in the root namespace ({used[0]})")


def _new_lab(lab_dir: Path, hosts: int) -> Lab:
    host_list = []
    for i in range(hosts):
        home = lab_dir / "hosts" / host_name(i)
        host_list.append(LabHost(
            name=host_name(i), index=i, address=host_address(i), netns=netns_name(i),
            veth=veth_name(i), home=home, workdir=home / "work", pid_base=(i + 1) * PID_STRIDE,
        ))  # fmt: skip
    client = lab_dir / "client"
    return Lab(
        dir=lab_dir, hosts=host_list, config_path=lab_dir / "migrate.yaml",
        client_key=client / "id_ed25519", known_hosts=client / "known_hosts",
        state_dir=lab_dir / "state",
    )  # fmt: skip


def _mkdir(lab: Lab, path: Path) -> None:
    lab.made.append(["dir", str(path)])
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _build(lab: Lab) -> None:
    """Make the lab, recording each thing in lab.made (and the state file) before making it."""
    save(lab)
    for path in (lab.client_key.parent, lab.state_dir, lab.dir / "hosts"):
        _mkdir(lab, path)
    for h in lab.hosts:
        for path in (h.home, h.sshd_config.parent, h.workdir):
            _mkdir(lab, path)
    save(lab)
    client_pub = sshd.keygen(lab.client_key, "migrate-lab-client")
    known = [sshd.write_config(h, client_pub, lab.strict_modes) for h in lab.hosts]
    lab.known_hosts.write_text("".join(line + "\n" for line in known))
    os.chmod(lab.known_hosts, 0o644)

    # Network. The unreachable /15 goes first (and comes out last): no lab address ever leaves.
    if not netns.route_exists():
        lab.made.append(["route", LAB_NET])
        save(lab)
        netns.add_route()
    lab.made.append(["link", BRIDGE])
    save(lab)
    netns.add_bridge()
    for h in lab.hosts:
        lab.made += [["netns", h.netns], ["link", h.veth]]
        save(lab)
        netns.add_netns(h.netns)
        netns.wire_host(h.index, h.netns, h.veth)
    lab.made += [["netns", CLIENT_NETNS], ["link", CLIENT_VETH]]
    save(lab)
    netns.add_netns(CLIENT_NETNS)
    netns.wire_client(CLIENT_NETNS, CLIENT_VETH, CLIENT_MAC, CLIENT_ADDRESS)

    for h in lab.hosts:
        start_sshd(lab, h)
    _check_ssh(lab)
    _write_config(lab)
    lab.complete = True
    save(lab)


def start_sshd(lab: Lab, h: LabHost) -> None:
    """Boot host h: its sshd as pid 1 of a fresh pid namespace, recorded before and after."""
    launcher = sshd.launch(h)
    lab.made.append(["proc", launcher.pid, proc.start_time(launcher.pid) or 0, "launcher"])
    save(lab)
    sshd.find_pid1(h, launcher)
    lab.made.append(["proc", h.sshd_pid, h.sshd_start, f"sshd {h.name}"])
    save(lab)
    # Its own cgroups: what its container runtimes make nests inside, and `down` removes it.
    before = lab.dir / LXC_V2_BEFORE
    if not before.exists():
        before.write_text("".join(f"{p}\n" for p in cgroups.lxc_v2()))
        lab.made.append(["file", str(before)])
    tag = hashlib.sha1(str(lab.dir).encode()).hexdigest()[:8]
    try:
        for path in cgroups.paths(f"migrate-lab-{tag}-{h.name}"):
            if ["cgroup", path] not in lab.made:
                lab.made.append(["cgroup", path])
                save(lab)
            cgroups.make_and_enter(path, h.sshd_pid)
    except (LabError, OSError) as e:
        log.warning("%s keeps this machine's cgroups (%s): lab down cannot remove what its "
                    "runtimes make there", h.name, e)  # fmt: skip


def _check_ssh(lab: Lab) -> None:
    """End to end, all hosts at once: key login with strict host keys, as the config says."""
    checks: list[tuple[LabHost, subprocess.Popen[bytes]]] = []
    try:
        for h in lab.hosts:
            netns.check_route_to(h.address)  # never connect to a lab address off the bridge
            sshd.wait_listening(h)
            cmd = sshd.ssh_argv(lab.client_key, lab.known_hosts, h.address, ["true"])
            out = subprocess.DEVNULL
            checks.append((h, subprocess.Popen(cmd, stdin=out, stdout=out, stderr=subprocess.PIPE)))
        for h, p in checks:
            _, err = p.communicate(timeout=30)
            if p.returncode != 0:
                msg = err.decode(errors="replace").strip()
                raise LabError(f"ssh to {h.name} failed: {msg} ({sshd.tail(h)})")
    except subprocess.TimeoutExpired as e:
        raise LabError(f"ssh check timed out: {' '.join(map(str, e.cmd))}") from e
    finally:
        for _, p in checks:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _write_config(lab: Lab) -> None:
    hosts: dict[str, Any] = {}
    for h in lab.hosts:
        hosts[h.name] = {
            "address": h.address,
            "port": 22,
            "user": "root",
            "key": str(lab.client_key),
            "known_hosts": str(lab.known_hosts),
            "workdir": str(h.workdir),
            "criu": "criu",
            # The hosts share this machine's filesystem: the same paths are valid on them.
            "rsync_key": str(lab.client_key),
            "rsync_known_hosts": str(lab.known_hosts),
        }
    cfg = {"state_dir": str(lab.state_dir), "hosts": hosts, "workloads": {}, "policy": POLICY}
    lab.made.append(["file", str(lab.config_path)])
    header = f"# migrate.yaml for the local lab at {lab.dir} (written by `migrate lab up`)\n"
    lab.config_path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))


def down(lab_dir: Path = DEFAULT_DIR) -> None:
    """Remove everything the lab at lab_dir made (from its state file): sshd pid-1s (SIGKILL,
    which ends each host's whole pid namespace), netns, interfaces, the unreachable route
    (last), then its files. Safe if already down, if run twice, or after a failed up()."""
    _require_root()
    lab_dir = Path(os.path.abspath(lab_dir))
    t0 = time.monotonic()
    with _locked(lab_dir, create=False):
        lab = read(lab_dir)
        if lab is None:
            _remove_dir_if_ours(lab_dir)
            return
        lab.complete = False
        save(lab)
        _teardown(lab)
    log.info("lab down in %.2fs", time.monotonic() - t0)


def _teardown(lab: Lab) -> None:
    """Undo lab.made: processes, then netns, links, route (after the bridge), then files."""
    errors: list[str] = []
    made = list(reversed(lab.made))
    # A frozen task (a container frozen in a host's cgroups) cannot die: thaw them first.
    for entry in made:
        if entry[0] == "cgroup":
            cgroups.thaw(entry[1])
    order = ("proc", "cgroup", "netns", "link", "route", "file", "dir")
    for kind in order:
        if kind == "netns":  # the hosts' processes are gone: so are LXC's v2 cgroups' tasks
            _remove_lxc_v2_cgroups(lab)
        for entry in made:
            if entry[0] != kind:
                continue
            try:
                _undo(entry)
            except (LabError, OSError) as e:
                errors.append(str(e))
    if errors:
        # Keep the state file: a later down() retries what is left.
        save(lab)
        raise LabError(
            f"lab down incomplete: {errors[0]}"
            + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
        )
    state_path(lab.dir).unlink(missing_ok=True)
    _remove_dir_if_ours(lab.dir)


LXC_V2_BEFORE = "lxc-v2-cgroups-before"


def _remove_lxc_v2_cgroups(lab: Lab) -> None:
    """LXC's cgroups in a hybrid host's v2 hierarchy made while the lab was up (the hosts' own
    cgroups cover the v1 ones), once empty: the lab's containers died with their hosts.
    Another lab's, or this machine's, still hold tasks and stay; best effort."""
    try:
        before = set((lab.dir / LXC_V2_BEFORE).read_text().split())
    except OSError:
        return
    for path in sorted(set(cgroups.lxc_v2()) - before):
        below = [os.path.join(top, d) for top, dirs, _ in os.walk(path, topdown=False)
                 for d in dirs]  # fmt: skip
        for cg in [*below, path]:
            try:
                os.rmdir(cg)  # (refused while a task is in it: not ours, or not dead yet)
            except OSError as e:
                log.warning("lab down: cannot remove cgroup %s: %s", cg, e.strerror)
                break


def _undo(entry: list[Any]) -> None:
    kind = entry[0]
    if kind == "proc":
        proc.kill(int(entry[1]), int(entry[2]))
    elif kind == "cgroup":
        cgroups.remove(entry[1])
    elif kind == "netns":
        netns.del_netns(entry[1])
    elif kind == "link":
        netns.del_link(entry[1])
    elif kind == "route":
        netns.del_route()
    elif kind == "file":
        Path(entry[1]).unlink(missing_ok=True)
    elif kind == "dir" and Path(entry[1]).exists():
        shutil.rmtree(entry[1])


def _remove_dir_if_ours(lab_dir: Path) -> None:
    """Remove lab_dir itself if up() created it and nothing foreign is left in it."""
    if not (lab_dir / ".made-by-lab").exists():
        (lab_dir / _LOCK).unlink(missing_ok=True)
        return
    left = {p.name for p in lab_dir.iterdir()} - {_LOCK, ".made-by-lab"}
    if left:
        log.warning("leaving %s: it still holds %s", lab_dir, ", ".join(sorted(left)))
        return
    shutil.rmtree(lab_dir)
