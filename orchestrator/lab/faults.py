"""Faults to inject into a running lab: crash a host and bring it back, cut the link between two
hosts and mend it. For fault-injection tests; each fault has its repair, and both are idempotent
enough to call from a test's finalizer."""

from __future__ import annotations

from . import netns, proc, sshd
from .core import _locked, start_sshd
from .state import Lab, LabError, LabHost

#: nftables table, in a host's netns, that cuts that host off from the peer with this index.
_CUT_TABLE = "migrate_lab_cut_{index}"
CUT_MODES = ("drop", "reject")


def host_up(lab: Lab, name: str) -> bool:
    """True while the host's sshd pid 1 (the host itself) runs."""
    h = lab.host(name)
    return proc.is_same(h.sshd_pid, h.sshd_start)


def kill_host(lab: Lab, name: str, silent: bool = False) -> None:
    """Crash a host: SIGKILL its sshd pid 1, which takes down its whole pid namespace (every
    process on the host, workloads included) at once. Its netns stays, so it can be revived.

    By default the kernel still closes the host's connections as its processes die, so peers
    see them end at once. With ``silent``, the host's interface goes down first: peers see
    nothing at all, as after a power loss, and only their timeouts notice."""
    h = lab.host(name)
    if not proc.is_same(h.sshd_pid, h.sshd_start):
        raise LabError(f"{name} is already down")
    if silent:
        proc.run(["ip", "-n", h.netns, "link", "set", "eth0", "down"])
    launcher = _parent(h.sshd_pid)
    proc.kill(h.sshd_pid, h.sshd_start)
    if launcher:
        # unshare --kill-child exits with its child; collect it if it is ours (lab up'd here).
        proc.wait_for(lambda: proc.start_time(launcher) is None, 5, f"launcher of {name} to exit")
        proc.reap(launcher)


def revive_host(lab: Lab, name: str) -> LabHost:
    """Boot a crashed host again: a fresh sshd pid 1 (new pid, mount and UTS namespaces) in the
    host's same netns, same address and host key; its interface up again. Recorded in the lab's
    state file, so ``down()`` removes it. A host that is up is left alone."""
    h = lab.host(name)
    if proc.is_same(h.sshd_pid, h.sshd_start):
        return h
    if not netns.netns_exists(h.netns):
        raise LabError(f"cannot revive {name}: its netns {h.netns} is gone (run lab down, up)")
    proc.run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
    with _locked(lab.dir, create=False):
        start_sshd(lab, h)
    sshd.wait_listening(h)
    return h


def cut_link(lab: Lab, a: str, b: str, mode: str = "drop") -> None:
    """Cut the link between lab hosts a and b, both ways, with nftables rules in both their
    netns; every other path (e.g. the controller to either host) stays up.

    ``drop``: packets vanish (a pulled cable: connections hang until a timeout notices).
    ``reject``: each host answers the other's TCP with a reset and the rest with ICMP
    host-unreachable, so connections fail at once (resets and ICMP errors still pass)."""
    if mode not in CUT_MODES:
        raise LabError(f"cut mode must be one of {', '.join(CUT_MODES)}, not {mode!r}")
    ha, hb = lab.host(a), lab.host(b)
    if ha.name == hb.name:
        raise LabError(f"cannot cut {a} from itself")
    for here, peer in ((ha, hb), (hb, ha)):
        _nft(here, _cut_script(_CUT_TABLE.format(index=peer.index), peer.address, mode))


def _cut_script(table: str, peer: str, mode: str) -> str:
    if mode == "drop":
        chains = {"input": [f"ip saddr {peer} drop"], "output": [f"ip daddr {peer} drop"]}
    else:
        # A reject in output never reaches the local socket: reject what comes in instead,
        # and let the peer's own resets and errors in, so each side learns at once.
        chains = {
            "input": [
                f"ip saddr {peer} tcp flags & rst == rst accept",
                f"ip saddr {peer} icmp type destination-unreachable accept",
                f"ip saddr {peer} meta l4proto tcp reject with tcp reset",
                f"ip saddr {peer} reject with icmp type host-unreachable",
            ]
        }
    body = "".join(
        f"  chain {chain} {{\n    type filter hook {chain} priority -150; policy accept;\n"
        + "".join(f"    {rule}\n" for rule in rules)
        + "  }\n"
        for chain, rules in chains.items()
    )
    # Declaring, deleting and re-making the table in one nft run replaces a cut already there.
    return f"table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n{body}}}\n"


def mend_link(lab: Lab, a: str, b: str) -> None:
    """Undo cut_link(a, b) (either mode); a link that is not cut is left alone."""
    ha, hb = lab.host(a), lab.host(b)
    for here, peer in ((ha, hb), (hb, ha)):
        table = _CUT_TABLE.format(index=peer.index)
        _nft(here, f"table inet {table}\ndelete table inet {table}\n")


def link_cut(lab: Lab, a: str, b: str) -> bool:
    """True while cut_link(a, b) is in force (on either side)."""
    ha, hb = lab.host(a), lab.host(b)
    for here, peer in ((ha, hb), (hb, ha)):
        table = _CUT_TABLE.format(index=peer.index)
        res = proc.run(["ip", "netns", "exec", here.netns, "nft", "list", "tables"], check=False)
        if f"table inet {table}" in res.stdout.splitlines():
            return True
    return False


def _nft(h: LabHost, script: str) -> None:
    """Apply an nft script atomically inside h's netns (which outlives h's processes)."""
    if not netns.netns_exists(h.netns):
        raise LabError(f"{h.name}: netns {h.netns} is gone")
    path = h.home / "cut.nft"
    path.write_text(script)
    try:
        proc.run(["ip", "netns", "exec", h.netns, "nft", "-f", str(path)])
    finally:
        path.unlink(missing_ok=True)


def _parent(pid: int) -> int:
    fields = proc._stat(pid)
    return int(fields[1]) if fields else 0
