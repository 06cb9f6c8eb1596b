"""Prometheus text-format metrics of a run, for node_exporter's textfile collector.

The file is written whole to a temporary file in the same directory and renamed over the old
one, so the collector never reads half a file. Each run replaces the file: give each scheduled
job its own file (e.g. /var/lib/node_exporter/textfile/migrate-evacuate-host-a.prom).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from orchestrator.config import ConfigError
from orchestrator.report import Report

OUTCOMES = ("succeeded", "rolled_back", "failed", "stranded")

_METRICS = (
    ("migrate_duration_seconds", "Wall time of the migration, seconds."),
    ("migrate_downtime_seconds", "Time the workload was frozen (dump to running), seconds."),
    ("migrate_transferred_bytes", "Bytes the migration sent between the hosts (rsync)."),
    ("migrate_succeeded", "1 if the migration succeeded, else 0."),
    ("migrate_outcome", "1 for the migration's outcome (label outcome)."),
)


def check_path(path: str | Path) -> Path:
    """The metrics file's directory must exist and be writable (checked before migrating)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--metrics-file {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--metrics-file {p}: directory {parent} is not writable")
    if p.is_dir():
        raise ConfigError(f"--metrics-file {p}: is a directory")
    return p


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(r: Report, **extra: str) -> str:
    pairs = {"workload": r.workload, "source": r.source, "destination": r.destination,
             "strategy": r.strategy, **extra}  # fmt: skip
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def render(reports: list[Report], now: float | None = None) -> str:
    """The text exposition of these reports (one sample per workload and metric)."""
    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}
    for r in reports:
        samples["migrate_duration_seconds"].append(f"{_labels(r)} {r.total_ms / 1000:g}")
        if r.downtime_ms is not None:
            samples["migrate_downtime_seconds"].append(f"{_labels(r)} {r.downtime_ms / 1000:g}")
        samples["migrate_transferred_bytes"].append(f"{_labels(r)} {r.bytes_transferred}")
        samples["migrate_succeeded"].append(f"{_labels(r)} {int(r.status == 'succeeded')}")
        for outcome in OUTCOMES:
            value = int(r.status == outcome)
            samples["migrate_outcome"].append(f"{_labels(r, outcome=outcome)} {value}")
    lines = []
    for name, help_text in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{sample}" for sample in samples[name]]
    stamp = time.time() if now is None else now
    lines += [
        "# HELP migrate_last_run_timestamp_seconds When this file was written (Unix time).",
        "# TYPE migrate_last_run_timestamp_seconds gauge",
        f"migrate_last_run_timestamp_seconds {stamp:.3f}",
    ]
    return "\n".join(lines) + "\n"


def write(path: str | Path, reports: list[Report]) -> None:
    """Atomically replace path with the metrics of reports (mode 0644, fsync'd)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(reports))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
