"""Containers with their own network move with their address, MAC and live TCP connections."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import lab as labmod
from tests.labkit import (
    NETAPPS,
    PYTHON,
    config_with,
    failing_restore_config,
    migrate,
    net_client,
    on,
    start_net_container,
    wait_for,
)

pytestmark = pytest.mark.lab

ADDRESS, MAC, VETH = "198.18.0.50", "02:6d:67:00:05:50", "vctr0"


def find(lab: labmod.Lab, host: str, needle: str) -> list[int]:
    """Pids on host whose command line holds needle."""
    out = on(lab, host, "ps -ww -e -o pid=,args=")
    return [int(ln.split()[0]) for ln in out.splitlines() if needle in ln]


@pytest.fixture
def container(lab: labmod.Lab) -> Iterator[list[str]]:
    """Tests append the needle of the container they start; it is killed wherever it runs."""
    needles: list[str] = []
    yield needles
    for needle in needles:
        for host in ("host-a", "host-b", "host-c"):
            pids = find(lab, host, needle)
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)
    for host in ("host-a", "host-b", "host-c"):  # its namespace, and veth, go asynchronously
        wait_for(lambda h=host: not on(lab, h, f"ip link show {VETH}", check=False), what=VETH)


def echo_server(lab: labmod.Lab, container: list[str], port: int) -> int:
    server = str(NETAPPS / "echo_server.py")
    container.append(f"{server} {port}")
    pid = start_net_container(lab, "host-a", f"{ADDRESS}/24", MAC, VETH, PYTHON, server, str(port))
    wait_for(lambda: "LISTEN" in on(lab, "host-a", f"nsenter -t {pid} -n ss -ltn"), what="listen")
    return pid


def run(
    lab: labmod.Lab,
    pid: int,
    src: str,
    dst: str,
    config: Path | None = None,
    strategy: str = "auto",
) -> dict:
    r = migrate("run", f"pid:{pid}", src, dst, "--strategy", strategy, "--json",
                config=config or lab.config_path)  # fmt: skip
    report: dict = json.loads(r.stdout)
    report["exit"] = r.returncode
    return report


def test_tcp_connection_survives_two_moves(
    lab: labmod.Lab, container: list[str], tmp_path: Path, record_property: Any
) -> None:
    pid = echo_server(lab, container, 7000)
    client = net_client(lab, "echo_client", ADDRESS, 7000, tmp_path)
    time.sleep(1)
    there = run(lab, pid, "host-a", "host-b")
    assert there["exit"] == 0, there
    net = there["network"]
    assert net["addresses"] == [f"{ADDRESS}/24"] and net["mac"] == MAC
    assert net["bridge"] == "br0" and net["connections_kept"] >= 1
    assert any(labmod.CLIENT_ADDRESS in c for c in net["connections"]), net
    pid_b = there["restored_pid"]
    assert find(lab, "host-b", "echo_server.py") and not find(lab, "host-a", "echo_server.py")
    assert MAC in on(lab, "host-b", f"nsenter -t {pid_b} -n ip -br link show eth0")
    time.sleep(1)
    back = run(lab, pid_b, "host-b", "host-a")  # and back again: it still serves
    assert back["exit"] == 0, back
    time.sleep(1)
    result = client.stop()
    record_property(
        "measured",
        f"echo over one TCP connection a -> b -> a: {result['received']} replies, largest reply "
        f"gap {result['max_gap_ms']} ms; freezes {there['downtime_ms']} / {back['downtime_ms']} ms",
    )
    assert result["error"] is None, result
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["out_of_order"] == 0
    assert result["received"] > 200  # ~3 s of 10 ms messages on ONE connection (no reconnect)


@pytest.mark.parametrize("strategy", ["stopcopy", "stream"])
def test_rollback_keeps_the_connection(
    lab: labmod.Lab, container: list[str], tmp_path: Path, strategy: str
) -> None:
    """Stop-copy's source comes back from its own images; stream's cannot (its pages went to
    the destination): its stopped copy is unlocked and runs on, connection and all."""
    pid = echo_server(lab, container, 7001)
    cfg = failing_restore_config(lab, tmp_path)
    client = net_client(lab, "echo_client", ADDRESS, 7001, tmp_path)
    time.sleep(1)
    report = run(lab, pid, "host-a", "host-b", cfg, strategy=strategy)
    assert report["exit"] == 3 and report["status"] == "rolled_back", report
    time.sleep(1)
    result = client.stop()
    assert result["error"] is None and result["lost"] == 0, result
    assert find(lab, "host-a", "echo_server.py") and not find(lab, "host-b", "echo_server.py")


def test_tcp_connection_survives_postcopy(
    lab: labmod.Lab, container: list[str], tmp_path: Path, record_property: Any
) -> None:
    pid = echo_server(lab, container, 7002)
    client = net_client(lab, "echo_client", ADDRESS, 7002, tmp_path)
    time.sleep(1)
    report = run(lab, pid, "host-a", "host-b", strategy="postcopy")
    assert report["exit"] == 0 and report["strategy"] == "postcopy", report
    assert report["network"]["connections_kept"] >= 1
    time.sleep(1)
    result = client.stop()
    record_property(
        "measured",
        f"echo over TCP, post-copy a -> b: {result['received']} replies, largest reply gap "
        f"{result['max_gap_ms']} ms; freeze {report['downtime_ms']} ms, post-copy tail "
        f"{report['postcopy_tail_ms']} ms",
    )
    assert result["error"] is None, result
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["out_of_order"] == 0
    assert find(lab, "host-b", "echo_server.py") and not find(lab, "host-a", "echo_server.py")


def test_postcopy_rollback_keeps_the_connection(
    lab: labmod.Lab, container: list[str], tmp_path: Path
) -> None:
    """The lazy dump is made to fail (not to finish), so CRIU itself unlocks the source."""
    pid = echo_server(lab, container, 7003)
    cfg = failing_restore_config(lab, tmp_path)
    client = net_client(lab, "echo_client", ADDRESS, 7003, tmp_path)
    time.sleep(1)
    report = run(lab, pid, "host-a", "host-b", cfg, strategy="postcopy")
    assert report["exit"] == 3 and report["status"] == "rolled_back", report
    time.sleep(1)
    result = client.stop()
    assert result["error"] is None and result["lost"] == 0, result
    assert find(lab, "host-a", "echo_server.py") and not find(lab, "host-b", "echo_server.py")


# Workers as root: root here lacks CAP_SYS_RESOURCE, so CRIU could not read the rlimits of
# workers running as another user ("Can't get rlimit 0: Operation not permitted").
NGINX_CONF = """daemon off;
user root;
master_process on;
worker_processes 2;
pid {dir}/nginx.pid;
error_log /dev/null crit;
events {{ worker_connections 64; }}
http {{
    access_log off;
    keepalive_timeout 300;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{ listen 8080; root {dir}/www; }}
}}
"""


def test_nginx_keeps_serving(
    lab: labmod.Lab, container: list[str], tmp_path: Path, record_property: Any
) -> None:
    site = lab.dir / "nginx-site"
    (site / "www").mkdir(parents=True, exist_ok=True)
    (site / "tmp").mkdir(exist_ok=True)
    (site / "www" / "file.txt").write_text("migrate " * 512)
    conf = site / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=site))
    container.append(f"-c {conf}")
    pid = start_net_container(lab, "host-a", f"{ADDRESS}/24", MAC, VETH,
                              "/usr/sbin/nginx", "-c", str(conf))  # fmt: skip
    wait_for(lambda: "8080" in on(lab, "host-a", f"nsenter -t {pid} -n ss -ltn"), what="nginx")
    assert on(lab, "host-a", f"pgrep -c -P {pid}").strip() == "2"  # master + 2 workers
    client = net_client(lab, "http_client", ADDRESS, 8080, tmp_path)
    time.sleep(1)
    report = run(lab, pid, "host-a", "host-b")
    assert report["exit"] == 0, report
    time.sleep(1)
    result = client.stop()
    record_property(
        "measured",
        f"nginx keep-alive: {result['requests']} requests, {result['failures']} failed, largest "
        f"gap {result['max_gap_ms']} ms; freeze {report['downtime_ms']} ms",
    )
    assert result["failures"] == 0 and result["requests"] > 50, result
    pid_b = report["restored_pid"]
    assert on(lab, "host-b", f"pgrep -c -P {pid_b}").strip() == "2"
    assert not find(lab, "host-a", f"-c {conf}")


def test_preflight_refuses_what_cannot_land(
    lab: labmod.Lab, container: list[str], tmp_path: Path
) -> None:
    pid = echo_server(lab, container, 7002)
    cfg = config_with(lab, tmp_path / "nobridge.yaml", host_b={"bridge": "nobr9"})
    report = run(lab, pid, "host-a", "host-b", cfg)
    assert report["exit"] == 1 and "bridge nobr9 does not exist on host-b" in report["error"]
    on(lab, "host-b", f"ip addr add {ADDRESS}/32 dev br0")
    try:
        report = run(lab, pid, "host-a", "host-b")
    finally:
        on(lab, "host-b", f"ip addr del {ADDRESS}/32 dev br0")
    assert report["exit"] == 1 and f"address {ADDRESS} is already in use" in report["error"]
    assert "nothing was changed" in " ".join(report["notes"])
    assert pid in find(lab, "host-a", "echo_server.py 7002")


def test_tcp_close_closes_connections_but_serves(
    lab: labmod.Lab, container: list[str], tmp_path: Path
) -> None:
    pid = echo_server(lab, container, 7003)
    config = yaml.safe_load(lab.config_path.read_text())
    config["workloads"] = {"echo": {"pid": pid, "network": {"tcp": "close"}}}
    cfg = tmp_path / "close.yaml"
    cfg.write_text(yaml.safe_dump(config))
    client = net_client(lab, "echo_client", ADDRESS, 7003, tmp_path)
    time.sleep(1)
    r = migrate("run", "echo", "host-a", "host-b", "--json", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    result = client.stop()
    assert result["error"] is not None  # the connection did not survive, by choice
    again = net_client(lab, "echo_client", ADDRESS, 7003, tmp_path)  # a new one is served
    time.sleep(0.5)
    fresh = again.stop()
    assert fresh["error"] is None and fresh["received"] > 10, fresh
