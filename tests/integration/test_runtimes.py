"""Containers of three runtimes (LXC, runc, Podman) move between lab hosts with their runtime's
own checkpoint/restore: real busybox containers, built here offline from busybox-static."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from tests.containerkit import (
    IMAGE,
    LXC_ADDRESS,
    LXC_MAC,
    LXC_VETH,
    RUNTIMES,
    Container,
    workload_config,
)
from tests.labkit import failing_restore_config, migrate, on, wait_for

pytestmark = pytest.mark.lab


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
    [("runc", "verify", "succeeded")],
    indirect=["container"],
)  # fmt: skip
def test_controller_killed_then_recover(
    lab: labmod.Lab, container: Container, tmp_path: Path, phase: str, expect: str
) -> None:
    """The controller dies in verify (held there by a health check that waits for a gate,
    opened once it is dead): recover confirms the destination copy. (Killed at transfer begin,
    every runtime's source comes back from its images or frozen state: tests/faults/
    test_round_two_hosts.py, held there by a cut link.)"""
    ctr = container
    cfg = workload_config(lab, tmp_path / "migrate.yaml", ctr)
    gate = lab.dir / "workloads" / f"gate-{ctr.name}"
    gate.parent.mkdir(exist_ok=True)
    gate.unlink(missing_ok=True)
    config = yaml.safe_load(cfg.read_text())
    config["workloads"][ctr.name]["health"] = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    cfg.write_text(yaml.safe_dump(config))
    before = ctr.count("host-a")
    migration = run_until_phase(cfg, ctr.name, phase)
    gate.touch()
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
