"""What workflows and activities pass each other (plain dataclasses and dicts: JSON on the wire).

Pure: imported by workflows inside Temporal's sandbox, so nothing here touches hosts or ssh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.report import PhaseResult, Report, Round

#: Activity names (workflows refer to activities by name: the sandbox never imports them).
SURVEY = "migrate.survey"
MIGRATE = "migrate.migrate"
HOLD = "migrate.hold"  # an evacuation's hold on the source's evacuation lock
#: Workflow names.
MIGRATE_WORKFLOW = "migrate"
EVACUATE_WORKFLOW = "evacuate"
#: The migration workflow's signal (an attempt's journal, before it changes anything) and
#: query (that journal, for a later attempt).
ANCHOR = "anchor"
JOURNAL = "journal"
#: The evacuation workflow's query (its placement so far and the workloads done) and signal
#: (from its hold activity: the source's evacuation lock is held, by whom).
PROGRESS = "progress"
HELD = "held"
#: ApplicationError types a retry cannot fix (bad config, busy workload, refused).
REFUSED = "Refused"
#: The host is being evacuated already (a local `migrate evacuate` holds its lock): exit 1.
BUSY = "Busy"


def migrate_id(workload: str) -> str:
    return f"migrate/{workload}"


def evacuate_id(host: str) -> str:
    return f"evacuate/{host}"


def side_queue(task_queue: str) -> str:
    """The task queue of evacuations' surveys and holds (every worker of task_queue polls it
    too): they never take one of the `--max-migrations` slots."""
    return f"{task_queue}.side"


@dataclass
class Timing:
    """How activities run: the engine takes a migration over after heartbeat_timeout seconds."""

    heartbeat_timeout: float = 10.0
    max_attempts: int = 5


@dataclass
class MigrateInput:
    workload: str  # a config name or pid:N / pidfile:PATH
    source: str
    destination: str
    strategy: str = "auto"
    dry_run: bool = False
    keep_images: bool = False
    workload_config: dict[str, Any] | None = None  # as the survey found it (evacuate)
    policy: dict[str, Any] = field(default_factory=dict)  # run's flags overriding the policy
    timing: Timing = field(default_factory=Timing)


@dataclass
class EvacuateInput:
    source: str
    to: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)
    parallel: int = 1
    strategy: str = "auto"
    dry_run: bool = False
    keep_images: bool = False
    timing: Timing = field(default_factory=Timing)
    #: Started by a schedule (whose runs get ids with a timestamp appended): the run then
    #: evacuates as a child with the plain id `evacuate/<host>`, so the engine's refusal of a
    #: second evacuation of the host holds for scheduled ones too.
    scheduled: bool = False


@dataclass
class SurveyInput:
    source: str
    to: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)


@dataclass
class HoldInput:
    source: str


def failed_report(workload: str, source: str, why: str, dest: str = "-") -> dict[str, Any]:
    """The report of a workload that never started migrating (as evacuate.failed)."""
    return Report(id="-", workload=workload, source=source, destination=dest, strategy="-",
                  error=why).to_dict()  # fmt: skip


def report_from_dict(d: dict[str, Any]) -> Report:
    """A Report back from its JSON form (Report.to_dict)."""
    d = dict(d)
    d["phases"] = [PhaseResult(**p) for p in d.get("phases") or []]
    d["rounds"] = [Round(**r) for r in d.get("rounds") or []]
    d.setdefault("planned_commands", [])
    known = Report.__dataclass_fields__
    return Report(**{k: v for k, v in d.items() if k in known})
