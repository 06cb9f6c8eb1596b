"""Record a host-facts case from this machine: runs `orchestrator.facts.argv` here and writes
tests/unit/facts/NAME.json with the output and the fields `parse` makes of it now.

    python -m tests.unit.facts.record NAME --description TEXT [--criu C] [--workdir W]
        [--feature F ...] [--command C ...] [--path PATH]      (from the checkout's root)

Read the `expected` fields against the real commands before committing a recording: it is
what the parser says, not yet what is true. `script_sha256` ties a real recording to the
script that made it (tests/unit/test_facts.py fails when the script changes: record again).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

from orchestrator import facts

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--description", required=True)
    p.add_argument("--criu", default="criu")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--feature", action="append", default=[])
    p.add_argument("--command", action="append", default=[])
    p.add_argument("--path", help="PATH for the run (e.g. one without rsync)")
    a = p.parse_args()
    env = dict(os.environ, PATH=a.path) if a.path else None
    argv = facts.argv(a.criu, a.workdir, a.feature, a.command)
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    parsed = facts.parse("host-a", r.stdout, r.returncode, r.stderr, a.workdir)
    case = {
        "description": a.description,
        "source": f"real: recorded on {platform.node()}, Linux {platform.release()}",
        "script_sha256": hashlib.sha256(facts.SCRIPT.encode()).hexdigest(),
        "args": {
            "criu": a.criu,
            "workdir": a.workdir,
            "features": a.feature,
            "commands": a.command,
            **({"PATH": a.path} if a.path else {}),
        },
        "host": "host-a",
        "exit_code": r.returncode,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "expected": json.loads(json.dumps(dataclasses.asdict(parsed))),
    }
    out = HERE / f"{a.name}.json"
    out.write_text(json.dumps(case, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
