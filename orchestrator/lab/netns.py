"""Lab networking with iproute2: root bridge + unreachable route, one netns per host.

Topology: root netns ``migbr0`` (198.18.0.254/24) <- veth ``migv-X`` | ``eth0`` -> ``br0``
(host address, MAC pinned to eth0's) inside netns ``mig-host-X``. Only names with the lab's
prefixes are ever created or deleted.
"""

from __future__ import annotations

import json
import os

from .proc import run
from .state import (
    BRIDGE,
    BRIDGE_ADDR,
    BRIDGE_MAC,
    LAB_NET,
    PREFIX_LEN,
    LabError,
    eth0_mac,
    host_address,
    veth_mac,
)


def link_exists(name: str) -> bool:
    """In this process's network namespace (/proc/net is; /sys/class/net is the mounter's)."""
    with open("/proc/self/net/dev") as dev:
        return any(line.split(":", 1)[0].strip() == name for line in dev.readlines()[2:])


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def route_exists() -> bool:
    """True if the root namespace already has a route for exactly the lab's /15."""
    return bool(run(["ip", "-4", "route", "show", "exact", LAB_NET]).stdout.strip())


def root_addresses_in_lab_net() -> list[str]:
    """Root-namespace addresses inside 198.18.0.0/15 (a conflict if the lab is not up)."""
    out = run(["ip", "-j", "-4", "addr", "show", "to", LAB_NET]).stdout
    return [
        f"{a['local']} on {i['ifname']}"
        for i in json.loads(out or "[]")
        for a in i.get("addr_info", [])
    ]


def add_route() -> None:
    run(["ip", "route", "add", "unreachable", LAB_NET])


def del_route() -> None:
    # Only the unreachable route for exactly the /15: never anything else.
    res = run(["ip", "route", "del", "unreachable", LAB_NET], check=False)
    if res.returncode != 0 and route_exists():
        raise LabError(f"could not remove route unreachable {LAB_NET}: {res.stderr.strip()}")


def add_bridge() -> None:
    run(["ip", "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge"])
    run(["ip", "link", "set", BRIDGE, "address", BRIDGE_MAC])  # pinned: no drift with ports
    run(["ip", "addr", "add", f"{BRIDGE_ADDR}/{PREFIX_LEN}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def del_link(name: str) -> None:
    if link_exists(name):
        res = run(["ip", "link", "del", name], check=False)
        if res.returncode != 0 and link_exists(name):
            raise LabError(f"could not delete interface {name}: {res.stderr.strip()}")


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])


def del_netns(name: str) -> None:
    if netns_exists(name):
        res = run(["ip", "netns", "del", name], check=False)
        if res.returncode != 0 and netns_exists(name):
            raise LabError(f"could not delete netns {name}: {res.stderr.strip()}")


def wire_host(i: int, netns: str, veth: str) -> None:
    """veth pair into the root bridge; inside netns: lo up, br0 with the address, eth0 in br0."""
    ns = ["ip", "-n", netns]
    run(
        [
            "ip",
            "link",
            "add",
            veth,
            "address",
            veth_mac(i),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            eth0_mac(i),
            "netns",
            netns,
        ]
    )
    run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    run([*ns, "link", "set", "lo", "up"])
    run([*ns, "link", "add", "br0", "address", eth0_mac(i), "type", "bridge"])
    run([*ns, "link", "set", "br0", "address", eth0_mac(i)])  # pinned to eth0's MAC
    run([*ns, "link", "set", "eth0", "master", "br0", "up"])
    run([*ns, "addr", "add", f"{host_address(i)}/{PREFIX_LEN}", "dev", "br0"])
    run([*ns, "link", "set", "br0", "up"])


def check_route_to(address: str) -> None:
    """Refuse to connect to a lab address unless the root netns routes it onto the lab bridge."""
    out = run(["ip", "-j", "route", "get", address], check=False).stdout
    try:
        dev = json.loads(out)[0].get("dev")
    except (ValueError, IndexError, AttributeError):
        dev = None
    if dev != BRIDGE:
        raise LabError(f"{address} is not routed via {BRIDGE} (got {dev!r}): not connecting")


def wire_client(netns: str, veth: str, mac: str, address: str) -> None:
    """The client namespace: a plain veth into the root bridge, its end eth0 with address."""
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac,
         "netns", netns])  # fmt: skip
    run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    ns = ["ip", "-n", netns]
    run([*ns, "link", "set", "lo", "up"])
    run([*ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0"])
    run([*ns, "link", "set", "eth0", "up"])
