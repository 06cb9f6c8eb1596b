"""Runtimes: one module per kind of workload, behind runtimes.base.Runtime."""

from __future__ import annotations

from orchestrator.config import WorkloadConfig
from orchestrator.runtimes.base import Runtime
from orchestrator.runtimes.process import ProcessRuntime

RUNTIMES: dict[str, type[Runtime]] = {ProcessRuntime.name: ProcessRuntime}


def for_workload(workload: WorkloadConfig) -> Runtime:
    return RUNTIMES[workload.runtime](workload)
