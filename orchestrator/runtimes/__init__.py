"""Runtimes: one module per kind of workload, behind runtimes.base.Runtime."""

from __future__ import annotations

from orchestrator.config import WorkloadConfig
from orchestrator.runtimes.base import Runtime
from orchestrator.runtimes.lxc import LxcRuntime
from orchestrator.runtimes.podman import PodmanRuntime
from orchestrator.runtimes.process import ProcessRuntime
from orchestrator.runtimes.runc import RuncRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    r.name: r for r in (ProcessRuntime, LxcRuntime, RuncRuntime, PodmanRuntime)
}


def for_workload(workload: WorkloadConfig) -> Runtime:
    return RUNTIMES[workload.runtime](workload)
