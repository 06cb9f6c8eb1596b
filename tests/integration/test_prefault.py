"""Stream's prefault (policy prefault) on a real lab host: it touches what it is asked
(MADV_POPULATE_WRITE, or one write per page where the kernel lacks it), then exits and frees
it; a stream migration with it on runs it on the destination before the freeze."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from orchestrator import lab as labmod
from orchestrator.criu import pagechannel
from tests.labkit import migrate, on, running_pids, start, wait_for

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("advice", ["23", "99999"])  # MADV_POPULATE_WRITE; one no kernel has
def test_prefault_touches_then_frees(lab: labmod.Lab, advice: str) -> None:
    argv = pagechannel.prefault_argv(48)
    argv[argv.index(pagechannel.PREFAULT)] = pagechannel.PREFAULT.replace("(23)", f"({advice})")
    out = on(lab, "host-b", '"$@"', *argv)
    assert re.fullmatch(r"prefaulted 48 MiB in \d+ ms\n", out), out


def test_a_stream_migration_prefaults_its_destination(
    lab: labmod.Lab, cleanup: list[Path], tmp_path: Path
) -> None:
    config = yaml.safe_load(lab.config_path.read_text())
    config["policy"] = {**(config.get("policy") or {}), "prefault": True}
    path = tmp_path / "migrate.yaml"
    path.write_text(yaml.safe_dump(config))
    wl = start(lab, "host-a", "counter-prefault", container=False)
    cleanup.append(wl.count_file)
    r = migrate("-v", "run", wl.spec, "host-a", "host-b", "--strategy", "stream", "--json",
                config=path)  # fmt: skip
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["status"] == "succeeded", r.stdout + r.stderr
    assert not any("prefault" in n for n in report["notes"]), report["notes"]
    # -v logs each command, its scripts by their size
    script = f"python3 -I -S -c '<script: {len(pagechannel.PREFAULT)} chars>'"
    ran = [ln.split("migrate: ", 1)[1] for ln in r.stderr.splitlines() if script in ln]
    assert len(ran) == 1 and ran[0].startswith("host-b") and " exit 0 " in ran[0], ran
    after = wl.count()
    wait_for(lambda: wl.count() > after + 5, what="the counter to keep counting on host-b")
    assert running_pids(lab, "host-a", wl.count_file) == []
