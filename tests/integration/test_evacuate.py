"""Evacuating a host on the real lab: placement by capacity, parallel migrations, a failure that
stops nothing else, the metrics file, and bringing workloads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import lab as labmod
from tests.labkit import BROKEN_CRIU, counter_pids, migrate, on, running_pids, wait_for

pytestmark = pytest.mark.lab

# Holds MIB MiB of its own memory and counts in a file every 50 ms.
HOLDER = r"""
import os, sys, time
count, mib = sys.argv[1], int(sys.argv[2])
keep = bytes(range(256)) * (4096 * mib)
n = 0
while True:
    n += 1
    with open(count, "w") as f:
        f.write(str(n))
    time.sleep(0.05)
"""

# The init of its own pid namespace (so its pids cannot clash on any destination).
LAUNCH = (
    'unshare --pid --fork --mount-proc --ipc --uts sh -c "$1" init "$2" "$3" "$4" '
    "</dev/null >/dev/null 2>&1 & echo $!"
)
INNER = 'umount -l /run/netns 2>/dev/null; exec setsid /usr/bin/python3 "$1" "$2" "$3" ' \
    "</dev/null >/dev/null 2>&1"  # fmt: skip


class Holder:
    def __init__(self, lab: labmod.Lab, host: str, name: str, mib: int = 16) -> None:
        work = lab.dir / "workloads"
        work.mkdir(exist_ok=True)
        script = work / "holder.py"
        script.write_text(HOLDER)
        self.name, self.count_file = name, work / name
        self.count_file.unlink(missing_ok=True)
        outer = on(lab, host, LAUNCH, INNER, str(script), str(self.count_file), str(mib)).strip()
        self.pid = int(wait_for(lambda: on(lab, host, 'pgrep -P "$1"', outer, check=False).strip(),
                                what="holder init"))  # fmt: skip
        wait_for(lambda: self.count() >= 5, what=f"{name} to count")
        self.rss_kb = int(on(lab, host, 'ps -o rss= -p "$1"', str(self.pid)).strip())

    def count(self) -> int:
        text = self.count_file.read_text().strip() if self.count_file.exists() else ""
        return int(text) if text.isdigit() else 0


def start_holders(lab: labmod.Lab, cleanup: list[Path], prefix: str, n: int) -> list[Holder]:
    holders = []
    for i in range(n):
        holders.append(Holder(lab, "host-a", f"{prefix}-{i}"))
        cleanup.append(holders[-1].count_file)
    return holders


def evac_config(lab: labmod.Lab, path: Path, holders: list[Holder], **hosts: dict) -> Path:
    """The lab's config, the holders placed on host-a (by pid), and some host keys changed."""
    config = yaml.safe_load(lab.config_path.read_text())
    config["workloads"] = {h.name: {"pid": h.pid, "host": "host-a"} for h in holders}
    for name, changes in hosts.items():
        config["hosts"][name].update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def overlap(lab: labmod.Lab, ids: list[str]) -> int:
    """The most migrations that were in flight at once, from their journals: from start to
    their confirm (--parallel bounds those; a confirm may finish while the next one runs)."""
    edges = []
    for mid in ids:
        events = [json.loads(ln) for ln in (lab.state_dir / "journal" / f"{mid}.jsonl")
                  .read_text().splitlines()]  # fmt: skip
        confirm = next((e for e in events if e.get("name") == "confirm"
                        and e.get("state") == "begin"), events[-1])  # fmt: skip
        edges += [(events[0]["t"], 1), (confirm["t"], -1)]
    running = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def test_evacuate_splits_by_capacity_runs_two_at_once_and_comes_back(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path, record_property
) -> None:
    holders = start_holders(lab, cleanup, "evac", 4)
    biggest = max(h.rss_kb for h in holders)
    cap_mb = math.ceil(2.5 * biggest / 1024)  # room for two each: the four must split
    cfg = evac_config(lab, tmp_path / "m.yaml", holders, **{
        "host-b": {"capacity_mb": cap_mb}, "host-c": {"capacity_mb": cap_mb}})  # fmt: skip

    # Dry run: the placement and the commands; nothing moves.
    r = migrate("evacuate", "host-a", "--to", "host-b", "--to", "host-c", "--dry-run", "--json",
                config=cfg)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    plan = json.loads(r.stdout)
    assert sorted(plan["placement"]["assigned"].values()) == ["host-b"] * 2 + ["host-c"] * 2
    assert all(any("criu dump" in c for c in w["planned_commands"]) for w in plan["workloads"])
    assert all(h.pid in running_pids(lab, "host-a", h.count_file) for h in holders)

    before = {h.name: h.count() for h in holders}
    prom = tmp_path / "evacuate.prom"
    r = migrate("evacuate", "host-a", "--to", "host-b", "--to", "host-c", "--parallel", "2",
                "--json", "--metrics-file", str(prom), config=cfg)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    reports = {w["workload"]: w for w in out["workloads"]}
    assert sorted(reports) == [h.name for h in holders]
    assert all(w["status"] == "succeeded" for w in reports.values()), r.stdout
    assert overlap(lab, [w["id"] for w in reports.values()]) == 2  # two at once, never three
    used: dict[str, int] = {"host-b": 0, "host-c": 0}
    for h in holders:
        dest = reports[h.name]["destination"]
        used[dest] += h.rss_kb
        assert reports[h.name]["restored_pid"] in running_pids(lab, dest, h.count_file)
        # None left on host-a (its unshare, the container's parent, exits with the container).
        wait_for(lambda h=h: not counter_pids(lab, "host-a", h.count_file), what="host-a empty")
    assert all(kb <= cap_mb * 1024 for kb in used.values()) and all(used.values()), used
    for h in holders:  # each kept its state: counting on from where it was
        now = h.count()
        assert now >= before[h.name]
        wait_for(lambda h=h, now=now: h.count() > now + 3, what=f"{h.name} to count on")

    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    ok = {s.labels["workload"]: s.value for s in families["migrate_succeeded"].samples}
    assert ok == {h.name: 1.0 for h in holders}
    downs = families["migrate_downtime_seconds"].samples
    assert len(downs) == 4 and all(0 < s.value < 30 for s in downs)
    record_property("measured", "evacuate 4 x ~{} MiB, parallel 2: downtime {} ms".format(
        biggest // 1024, ", ".join(str(w["downtime_ms"]) for w in reports.values())))  # fmt: skip

    # host-a is empty now (the journal says where each went); bring them all back.
    r = migrate("evacuate", "host-a", "--json", config=cfg)
    assert r.returncode == 0 and json.loads(r.stdout)["workloads"] == [], r.stdout + r.stderr
    # From host-b with evacuate --only; from host-c one by one with `run NAME` (which finds
    # each under the pid it was restored with there, from the journal).
    from_b = [n for n, w in reports.items() if w["destination"] == "host-b"]
    r = migrate("evacuate", "host-b", "--to", "host-a", "--parallel", "2",
                *[a for n in from_b for a in ("--only", n)], config=cfg)  # fmt: skip
    assert r.returncode == 0 and "2 of 2 workload(s) moved" in r.stdout, r.stdout + r.stderr
    for name in (n for n, w in reports.items() if w["destination"] == "host-c"):
        r = migrate("run", name, "host-c", "host-a", config=cfg)
        assert r.returncode == 0, r.stdout + r.stderr
    for h in holders:
        assert len(running_pids(lab, "host-a", h.count_file)) == 1, h.name
        for other in ("host-b", "host-c"):
            wait_for(lambda h=h, o=other: not counter_pids(lab, o, h.count_file), what="gone")


def test_one_failure_stops_nothing_else(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path
) -> None:
    holders = start_holders(lab, cleanup, "evfail", 3)
    biggest = max(h.rss_kb for h in holders)
    broken = tmp_path / "criu-fails-restore"
    broken.write_text(BROKEN_CRIU)
    broken.chmod(0o755)
    # host-b takes two; the third goes to host-c, whose restore fails.
    cfg = evac_config(lab, tmp_path / "m.yaml", holders, **{
        "host-b": {"capacity_mb": math.ceil(2.5 * biggest / 1024)},
        "host-c": {"capacity_mb": math.ceil(1.2 * biggest / 1024), "criu": str(broken)},
    })  # fmt: skip
    prom = tmp_path / "evacuate.prom"
    r = migrate("evacuate", "host-a", "--to", "host-b", "--to", "host-c", "--parallel", "2",
                "--metrics-file", str(prom), config=cfg)  # fmt: skip
    assert r.returncode != 0, r.stdout + r.stderr
    names = {h.name for h in holders}
    rows = [ln.split() for ln in r.stdout.splitlines()]
    rows = [row for row in rows if len(row) > 2 and row[0] in names and row[1].startswith("host")]
    outcome = {row[0]: (row[1], row[2]) for row in rows}
    assert sorted(outcome.values()) == [("host-b", "succeeded")] * 2 + [("host-c", "rolled_back")]
    assert "criu restore failed on host-c" in r.stderr and "injected" in r.stderr
    assert "2 of 3 workload(s) moved" in r.stdout
    for h in holders:
        dest, status = outcome[h.name]
        where = "host-b" if status == "succeeded" else "host-a"
        assert running_pids(lab, where, h.count_file), (h.name, where)
        for other in {"host-a", "host-b", "host-c"} - {where}:
            wait_for(lambda h=h, o=other: not counter_pids(lab, o, h.count_file), what="gone")
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    failed = [s.labels["workload"] for s in families["migrate_outcome"].samples
              if s.labels["outcome"] == "rolled_back" and s.value == 1]  # fmt: skip
    assert failed == [n for n, (_, st) in outcome.items() if st == "rolled_back"]


def accepted(lab: labmod.Lab, host: str) -> list[str]:
    """Where each ssh connection host's sshd has accepted so far came from (its log)."""
    lines = lab.host(host).sshd_log.read_text(errors="replace").splitlines()
    return [ln.split(" from ", 1)[1].split()[0] for ln in lines if "Accepted publickey" in ln]


# A criu whose first restore fails (as labkit.BROKEN_CRIU's do); the others are the real one.
ONCE_BROKEN_CRIU = BROKEN_CRIU.replace(
    'if [ "$1" = restore ] || [ "$1" = swrk ]; then',
    'if { [ "$1" = restore ] || [ "$1" = swrk ]; } && mkdir "$0.failed" 2>/dev/null; then',
)


def test_an_evacuation_shares_one_connection_per_host_and_one_failure_rolls_back_alone(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path
) -> None:
    """Four workloads to host-b, two at a time, over one connection to each host (survey and
    migrations) and one ssh link from host-a to host-b; host-b's first restore fails: that
    migration rolls back on its own while the three others move."""
    holders = start_holders(lab, cleanup, "evshare", 4)
    criu = tmp_path / "criu-fails-once"
    criu.write_text(ONCE_BROKEN_CRIU)
    criu.chmod(0o755)
    cfg = evac_config(lab, tmp_path / "m.yaml", holders, **{"host-b": {"criu": str(criu)}})
    seen = {h: len(accepted(lab, h)) for h in ("host-a", "host-b")}
    r = migrate("evacuate", "host-a", "--to", "host-b", "--parallel", "2", "--json",
                config=cfg)  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr  # the rest rolled back
    reports = {w["workload"]: w for w in json.loads(r.stdout)["workloads"]}
    status = {n: w["status"] for n, w in reports.items()}
    assert sorted(status.values()) == ["rolled_back"] + ["succeeded"] * 3, r.stdout
    assert criu.with_name(criu.name + ".failed").is_dir()  # the injected failure was the cause
    for h in holders:
        where = "host-b" if status[h.name] == "succeeded" else "host-a"
        assert running_pids(lab, where, h.count_file), (h.name, where)
        other = "host-a" if where == "host-b" else "host-b"
        wait_for(lambda h=h, o=other: not counter_pids(lab, o, h.count_file), what="gone")
        now = h.count()
        wait_for(lambda h=h, now=now: h.count() > now + 3, what=f"{h.name} to count on")
    new = {h: accepted(lab, h)[n:] for h, n in seen.items()}
    controller = new["host-a"]
    assert len(controller) == 1, new  # the survey and all four migrations: one connection
    a_addr = lab.host("host-a").address
    assert sorted(new["host-b"]) == sorted([*controller, a_addr]), new  # + one link from host-a
    # Nothing left: no image dir, no link master on host-a.
    for host in ("host-a", "host-b"):
        assert not [p for p in (lab.host(host).workdir / "images").glob("*")
                    if any(w["id"] in p.name for w in reports.values())], host  # fmt: skip
    masters = [ln for ln in on(lab, "host-a", "ps -ww -e -o args=").splitlines()
               if "ControlMaster=yes" in ln and "ssh-evac-" in ln]  # fmt: skip
    assert not masters, masters
    for h in holders:  # leave host-b clean for the next test
        pids = counter_pids(lab, "host-b", h.count_file)
        if pids:
            on(lab, "host-b", 'kill -KILL "$@"', *map(str, pids))
