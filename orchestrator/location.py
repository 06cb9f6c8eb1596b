"""Where each configured workload is now: its last successful migration's destination (the
journal), else the host its config names (`host:`). Used by `evacuate` to find what is on a host,
and by `run NAME` to find a moved workload under the pid it has now."""

from __future__ import annotations

import dataclasses

from orchestrator import journal
from orchestrator.config import Config, WorkloadConfig


def whereabouts(
    config: Config, history: list[journal.Summary] | None = None
) -> dict[str, tuple[str, WorkloadConfig]]:
    """Each configured workload's host now, and its config there.

    A workload's last successful migration (the journal) says where it went, and under which
    pid when it is found by pid; without one, the config's `host:` says where it is."""
    where = {n: (w.host, w) for n, w in config.workloads.items() if w.host is not None}
    if history is None:
        history = journal.summaries(config.state_dir)
    for j in history:  # oldest first: the last one wins
        wl = config.workloads.get(j.workload)
        if wl is None or j.status != "succeeded":
            continue
        if wl.pid is not None and j.restored_pid:
            wl = dataclasses.replace(wl, pid=j.restored_pid)
        where[j.workload] = (j.destination, wl)
    return {n: hw for n, hw in where.items() if hw[0] is not None}  # type: ignore[misc]


def workloads_on(config: Config, host: str) -> dict[str, WorkloadConfig]:
    return {n: wl for n, (h, wl) in sorted(whereabouts(config).items()) if h == host}
