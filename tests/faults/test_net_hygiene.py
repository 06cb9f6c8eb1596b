"""Nothing of CRIU's network lock outlives a migration, and a rollback leaves the workload as
it was: a plain process tree (no network namespace of its own) dumped with --tcp-established
holds a TCP connection inside itself; after confirm no lock rule is left on the source, after a
rollback its sockets work (out of repair mode, unlocked) and a task it had stopped itself stays
stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.faults.kit import Case, fault_config, run_migrate
from tests.labkit import BROKEN_CRIU, NETAPPS, PYTHON, Workload, on, wait_for

pytestmark = pytest.mark.lab


def start_pair(lab: labmod.Lab, name: str, stopped: bool = False) -> Workload:
    """tests/netapps/tcp_pair.py on host-a, counting round trips over its own connection."""
    work = lab.dir / "workloads"
    work.mkdir(exist_ok=True)
    count, pidfile = work / name, work / f"{name}.pid"
    for f in (count, pidfile):
        f.unlink(missing_ok=True)
    extra = ["stopped"] if stopped else []
    on(lab, "host-a", 'setsid "$@" </dev/null >/dev/null 2>&1 &', PYTHON,
       str(NETAPPS / "tcp_pair.py"), str(count), *extra)  # fmt: skip
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
    wl = Workload(name, count, f"pidfile:{pidfile}", int(pidfile.read_text()))
    wait_for(lambda: wl.count() >= 10, what="round trips")
    return wl


def lock_rules(lab: labmod.Lab, host: str) -> list[str]:
    """CRIU's network-lock rules in host's namespace (iptables, nftables tables)."""
    rules = on(lab, host, "iptables-save -t filter 2>/dev/null; nft list tables 2>/dev/null")
    return [ln for ln in rules.splitlines() if "0xc114" in ln or " CRIU-" in ln]


def config(lab: labmod.Lab, tmp: Path, wl: Workload, broken: bool = False) -> Path:
    hosts = {}
    if broken:
        criu = tmp / "criu-fails-restore"
        criu.write_text(BROKEN_CRIU)
        criu.chmod(0o755)
        hosts = {"host-b": {"criu": str(criu)}}
    workload = {"pidfile": f"{wl.count_file}.pid", "criu_options": ["--tcp-established"]}
    return fault_config(lab, tmp / "migrate.yaml", state_dir=tmp / "state", hosts=hosts,
                        workloads={"pair": workload})  # fmt: skip


def states(lab: labmod.Lab, host: str, wl: Workload) -> dict[int, str]:
    """pid -> state letter of every process of the workload on host."""
    out = on(lab, host, "ps -ww -e -o pid=,stat=,args=")
    return {int(f[0]): f[1][0] for f in (ln.split() for ln in out.splitlines())
            if str(wl.count_file) in f}  # fmt: skip


def test_no_lock_rule_is_left_after_confirm(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "plain tree with TCP: confirm leaves no network-lock rule"
    wl = start_pair(lab, "pair-confirm")
    cleanup.append(wl.count_file)
    out = run_migrate("run", "pair", "host-a", "host-b", "--json",
                      config=config(lab, tmp_path, wl))  # fmt: skip
    case.ended(out)
    assert out.status == "succeeded", out
    now = wl.count()
    wait_for(lambda: wl.count() > now + 5, what="round trips on host-b")
    assert lock_rules(lab, "host-a") == []
    assert lock_rules(lab, "host-b") == []
    assert not states(lab, "host-a", wl)


def test_rollback_leaves_sockets_usable_and_a_self_stopped_task_stopped(
    lab: labmod.Lab, cleanup: list[Path], case: Case, tmp_path: Path
) -> None:
    case.fault = "plain tree with TCP and a self-stopped task: restore fails, rolled back"
    wl = start_pair(lab, "pair-rollback", stopped=True)
    cleanup.append(wl.count_file)
    before = states(lab, "host-a", wl)
    stopped = [p for p, s in before.items() if s == "T"]
    assert len(stopped) == 1 and len(before) == 3, before
    out = run_migrate("run", "pair", "host-a", "host-b", "--json",
                      config=config(lab, tmp_path, wl, broken=True))  # fmt: skip
    case.ended(out)
    assert out.status == "rolled_back", out
    # Its connection works again on host-a: round trips go on (a socket left in repair mode,
    # or behind a DROP rule, would stall them for good).
    now = wl.count()
    wait_for(lambda: wl.count() > now + 5, what="round trips on host-a after the rollback")
    assert lock_rules(lab, "host-a") == []
    after = states(lab, "host-a", wl)
    assert after == {**before, **{p: "S" for p, s in before.items() if s == "R"}}, after
    assert [p for p, s in after.items() if s == "T"] == stopped
    assert not states(lab, "host-b", wl)
