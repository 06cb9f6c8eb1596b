"""Runs INSIDE the soft-dirty VM (tests/vm/test_precopy_vm.py boots it): the two-host lab,
a 256 MiB writer, `migrate run --strategy precopy` host-a -> host-b, then stop-copy back,
then `--strategy hybrid` (pre-copy rounds, then post-copy) host-a -> host-b again.

Not collected on the host (its name is not test_*.py): the host's kernel has no soft-dirty.
Writes what it measured to $VM_OUT/result.json for the host-side test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import lab as labmod
from tests.labkit import PYTHON, counter_pids, migrate, on, wait_for

WRITER = Path(__file__).parent / "writer.py"
SIZE_MIB = 256
HOT_MIB = 24  # rewritten 1 MiB per 100 ms; a round dirties at most this much
# The writer's pages are fills of one byte: compressed, the link under TCG (~2 MB/s of ssh)
# moves them fast enough for the rounds to converge. Both strategies get the same options.
OPTIONS = ("--compress", "--json")


@pytest.fixture(scope="module")
def lab() -> Iterator[labmod.Lab]:
    # The guest's own kernel: CRIU's lazy transfer (hybrid) wants big pipes, as setup-host sets.
    Path("/proc/sys/fs/pipe-max-size").write_text("4194304")
    base = Path(tempfile.mkdtemp(prefix="migrate-lab-", dir="/run"))
    try:
        yield labmod.up(base / "lab", hosts=2)
    finally:
        labmod.down(base / "lab")
        shutil.rmtree(base, ignore_errors=True)


def tick(state: Path) -> int:
    text = state.read_text().strip() if state.exists() else ""
    assert not text.startswith("CORRUPT"), text
    return int(text) if text.isdigit() else 0


def test_precopy_converges_and_freezes_shorter_than_stopcopy(lab: labmod.Lab) -> None:
    r = migrate("check", "host-a", "host-b", config=lab.config_path)
    assert "mem_dirty_track" in r.stdout, r.stdout + r.stderr  # this kernel has soft-dirty
    state = lab.dir / "writer.state"
    pid = int(on(lab, "host-a", 'setsid "$@" </dev/null >/dev/null 2>&1 & echo $!',
                 PYTHON, str(WRITER), str(state), str(SIZE_MIB), str(HOT_MIB)).strip())  # fmt: skip
    try:
        wait_for(lambda: tick(state) >= 10, timeout=120, what="the writer to start")
        before = tick(state)
        r = migrate("run", f"pid:{pid}", "host-a", "host-b", "--strategy", "precopy", *OPTIONS,
                    config=lab.config_path, timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        pre = json.loads(r.stdout)
        after = tick(state)
        wait_for(lambda: tick(state) > after + 5, timeout=60, what="the writer on host-b")
        assert after >= before
        # Same workload, same guest: stop-copy back, for its freeze.
        back = migrate("run", f"pid:{pre['restored_pid']}", "host-b", "host-a", "--strategy",
                       "stopcopy", *OPTIONS, config=lab.config_path, timeout=900)  # fmt: skip
        assert back.returncode == 0, back.stdout + back.stderr
        stop = json.loads(back.stdout)
        last = tick(state)
        wait_for(lambda: tick(state) > last + 5, timeout=60, what="the writer on host-a")
        # And the hybrid: rounds while it runs, then post-copy for what they left.
        hyb = migrate("run", f"pid:{stop['restored_pid']}", "host-a", "host-b", "--strategy",
                      "hybrid", *OPTIONS, config=lab.config_path, timeout=900)  # fmt: skip
        assert hyb.returncode == 0, hyb.stdout + hyb.stderr
        hybrid = json.loads(hyb.stdout)
        final = tick(state)
        wait_for(lambda: tick(state) > final + 5, timeout=60, what="the writer on host-b again")
    finally:
        for host in lab.names:  # whichever copy is left, by pid
            pids = counter_pids(lab, host, state)
            if pids:
                on(lab, host, 'kill -KILL "$@"', *map(str, pids), check=False)
    result = {
        "precopy": {k: pre[k] for k in ("rounds", "stopped_by", "downtime_ms", "total_ms",
                                        "bytes_transferred", "phases", "notes")},
        "stopcopy": {k: stop[k] for k in ("downtime_ms", "total_ms", "bytes_transferred")},
        "hybrid": {k: hybrid[k] for k in ("rounds", "stopped_by", "downtime_ms", "total_ms",
                                          "postcopy_tail_ms", "transfer", "notes")},
        "ticks": [before, after, last, final],
    }  # fmt: skip
    Path(os.environ.get("VM_OUT", lab.dir), "result.json").write_text(json.dumps(result))
    rounds = pre["rounds"]
    pre_rounds = [x for x in rounds if x["kind"] == "pre-dump"]
    assert len(pre_rounds) >= 2 and rounds[-1]["kind"] == "dump"
    assert rounds[-1]["pages_written"] * 4 < rounds[0]["pages_written"]
    assert pre["downtime_ms"] < stop["downtime_ms"]
    assert hybrid["strategy"] == "hybrid" and hybrid["postcopy_tail_ms"] is not None
    assert any(x["kind"] == "pre-dump" for x in hybrid["rounds"])
    lazy = hybrid["rounds"][-1]  # what was left for post-copy: far less than the first round
    assert lazy["kind"] == "lazy-dump" and lazy["pages_written"] * 4 < rounds[0]["pages_written"]
    assert hybrid["downtime_ms"] < stop["downtime_ms"]


def test_hybrid_gives_nobody_a_page(lab: labmod.Lab) -> None:
    """Issue #14 for hybrid: an attacker as nobody on each host during the run gets and
    changes no page (tests/integration/test_page_channel.py does stream and post-copy)."""
    from tests.integration.test_page_channel import make_arena, thieves_during

    with make_arena() as arena:
        measured = thieves_during(lab, arena, "hybrid", "--compress", slow=4.0, mib=16)
    print(f"measured: hybrid: {measured}")
