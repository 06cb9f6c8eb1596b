"""The activities a worker runs: the survey of an evacuation, and one migration.

A migration is the very path `migrate run` takes (orchestrator.session: journal, lock, phases,
undo). While it runs the activity heartbeats, at every phase change and every second: the
migration id, phase, bytes moved, round, and the journal so far. That heartbeat is what makes a
retry safe and lets any worker take over: when a worker dies (SIGKILL, its machine gone), the
engine sees no heartbeat for `heartbeat_timeout` and hands the activity to another worker,
with the last heartbeat's details. That attempt first *settles* the previous one: it takes the
workload's lock on the source (so a still-running predecessor is never second-guessed), and
runs `migrate recover` on the previous attempt's journal (the worker's own state dir if it is
there, e.g. shared; else rebuilt from the heartbeat), which finishes or rolls back from both
hosts' facts. It never dumps again: the settled outcome is the activity's result.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from orchestrator import journal, progress
from orchestrator.config import (
    Config,
    ConfigError,
    NetworkConfig,
    WorkloadConfig,
    check_policy,
    load,
)
from orchestrator.errors import MigrationError
from orchestrator.evacuate import EvacuationBusy, room, select, take_lock
from orchestrator.fleet.types import (
    ANCHOR,
    BUSY,
    HELD,
    HOLD,
    MIGRATE,
    REFUSED,
    SURVEY,
    HoldInput,
    MigrateInput,
    SurveyInput,
    evacuate_id,
)
from orchestrator.recover import recover
from orchestrator.report import Report
from orchestrator.runtimes import for_workload
from orchestrator.session import Busy, Session, open_session
from orchestrator.transport.ssh import Host, HostError, LockBusy

log = logging.getLogger("migrate")

#: Seconds between heartbeats while a phase runs (phase changes heartbeat at once).
TICK = 1.0
#: Fault injection for the tests (tests/fleet): `lose-heartbeat-journal` sends heartbeats
#: without the journal, as if every heartbeat after the start had been lost with the worker,
#: so that a retry has only the journal anchored in the workflow.
FAULT = os.environ.get("MIGRATE_FLEET_FAULT", "")


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def refused(message: str) -> ApplicationError:
    """A failure no retry can fix (bad names, busy workload): the workflow reports it."""
    return ApplicationError(message, type=REFUSED, non_retryable=True)


def workload_from_dict(raw: dict[str, Any]) -> WorkloadConfig:
    """A WorkloadConfig back from its JSON form (dataclasses.asdict)."""
    raw = dict(raw)
    raw["criu_options"] = tuple(raw.get("criu_options") or ())
    raw["network"] = NetworkConfig(**(raw.get("network") or {}))
    raw["sync_paths"] = tuple(raw.get("sync_paths") or ())
    return WorkloadConfig(**raw)


class Activities:
    """Bound to this worker's config (re-read for every activity: edits apply at once)."""

    def __init__(
        self,
        config_path: Path,
        client: Client | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config_path = config_path
        self.identity = identity()
        self.client = client  # the worker's: anchors journals in the workflow (see _Heartbeat)
        self.loop = loop

    def _config(self, policy: dict[str, Any] | None = None) -> Config:
        try:
            config = load(self.config_path)
            if policy:
                changed = dataclasses.replace(config.policy, **policy)
                check_policy(changed, "", flags=True)
                config = dataclasses.replace(config, policy=changed)
            return config
        except (ConfigError, TypeError) as e:
            raise refused(f"worker {self.identity}: {e}") from None

    # -- survey ---------------------------------------------------------------------------------

    @activity.defn(name=SURVEY)
    def survey(self, inp: SurveyInput) -> dict[str, Any]:
        """What evacuating inp.source means now (read-only): its workloads with their RSS and
        the destinations' room, for the workflow to place."""
        config = self._config()
        try:
            config.host(inp.source)
            dests = list(dict.fromkeys(inp.to or [h for h in config.hosts if h != inp.source]))
            for d in dests:
                config.host(d)
                if d == inp.source:
                    raise ConfigError(
                        f"--to {d}: the destination cannot be the host being evacuated"
                    )
            if not dests:
                raise ConfigError(f"no destination: the config has no host besides {inp.source}")
            workloads = select(config, inp.source, inp.only)
        except ConfigError as e:
            raise refused(str(e)) from None
        rss: dict[str, int] = {}
        missing: dict[str, str] = {}
        found: dict[str, WorkloadConfig] = {}
        src = Host(config.host(inp.source), config.policy)
        try:
            for name, wl in workloads.items():
                activity.heartbeat({"survey": name})
                try:
                    rss[name] = for_workload(wl).locate(src).rss_kb
                    found[name] = wl
                except (MigrationError, HostError) as e:
                    missing[name] = str(e)
        finally:
            src.close()
        bins = [b for b in (room(config, d) for d in dests) if b is not None]
        return {
            "source": inp.source,
            "destinations": dests,
            "workloads": {n: asdict(wl) for n, wl in workloads.items()},
            "rss_kb": rss,
            "missing": missing,
            "bins": [asdict(b) for b in bins],
        }

    # -- the evacuation lock ---------------------------------------------------------------------

    @activity.defn(name=HOLD, no_thread_cancel_exception=True)
    def hold(self, inp: HoldInput) -> None:
        """Hold the source's evacuation lock (the one a local `migrate evacuate` takes) until
        the evacuation workflow cancels this, heartbeating; tell the workflow once it is held
        (signal HELD, with the holder). A host being evacuated already is BUSY (no retry); a
        host that cannot be reached, or a lock lost and not taken back, is retried."""
        info = activity.info()
        signal = self._signaller(info, HELD)
        if signal is None:
            raise ApplicationError("no engine client to tell the workflow", non_retryable=True)
        config = self._config()
        try:
            host_cfg = config.host(inp.source)
        except ConfigError as e:
            raise refused(str(e)) from None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder = (f"fleet evacuation {evacuate_id(inp.source)} by worker {self.identity} "
                  f"since {since}")  # fmt: skip
        src = Host(host_cfg, config.policy)
        try:
            try:
                lock = take_lock(src, host_cfg.workdir, holder)
                signal(holder)
                while not activity.is_cancelled() and not activity.is_worker_shutdown():
                    activity.heartbeat()
                    lock.ensure()  # lost with its connection: taken back, or BUSY
                    activity.wait_for_cancelled_sync(TICK)
                lock.release()
                if not activity.is_cancelled():  # this worker stops: another takes it over
                    raise ApplicationError(f"worker {self.identity} stopped holding the lock")
            except EvacuationBusy as e:
                raise _busy(inp.source, e.holder, str(e)) from None
            except LockBusy as e:
                why = f"{inp.source}'s evacuation lock, lost with its connection, is held by "
                raise _busy(inp.source, e.holder, why + e.holder) from None
            except (HostError, MigrationError) as e:
                raise ApplicationError(f"the evacuation lock of {inp.source}: {e}") from None
        finally:
            src.close()

    # -- one migration --------------------------------------------------------------------------

    # no_thread_cancel_exception: the SDK would otherwise raise CancelledError at any point of
    # this thread when the engine gives the attempt up (heartbeat timeout, worker shutdown),
    # e.g. half way through an undo or a recover. An attempt the engine gave up runs to its own
    # end instead (holding the workload's lock, so the next attempt waits for it: _recover).
    @activity.defn(name=MIGRATE, no_thread_cancel_exception=True)
    def migrate(self, inp: MigrateInput) -> dict[str, Any]:
        info = activity.info()
        previous = info.heartbeat_details[0] if info.heartbeat_details else None
        pulse = _Pulse(self.identity, info.attempt, previous)
        with _Ticker(pulse.send):  # from the first moment: settling may take a while too
            pulse.send()
            return self._migrate(inp, info, pulse, previous)

    def _migrate(
        self, inp: MigrateInput, info: activity.Info, pulse: _Pulse, previous: Any
    ) -> dict[str, Any]:
        config = self._config(inp.policy)
        wl_config = workload_from_dict(inp.workload_config) if inp.workload_config else None
        try:
            name = wl_config.name if wl_config else config.workload(inp.workload).name
        except ConfigError as e:
            raise refused(str(e)) from None
        if info.attempt > 1 or previous:
            earlier = _candidates(previous, self._anchored(info))
            settled = self._settle(config, name, earlier, info.attempt)
            if settled is not None:
                return settled.to_dict()
        try:
            session = open_session(
                config, inp.workload, inp.source, inp.destination, strategy=inp.strategy,
                keep_images=inp.keep_images, dry_run=inp.dry_run, workload_config=wl_config,
            )  # fmt: skip
        except (Busy, ConfigError, MigrationError, HostError) as e:
            raise refused(str(e)) from None
        beat = _Heartbeat(session, pulse, self._anchor(info))
        pulse.send()  # the id first: from here on a retry settles this attempt, never starts anew
        report = session.run(progress.listener(session.ctx, beat.event))
        beat.final = True
        pulse.send()
        report.notes.append(f"run by worker {self.identity} (attempt {info.attempt})")
        return report.to_dict()

    def _anchor(self, info: activity.Info) -> Callable[[list[dict[str, Any]]], None] | None:
        """A function that hands the workflow this attempt's journal (see _signaller)."""
        return self._signaller(info, ANCHOR)

    def _signaller(self, info: activity.Info, name: str) -> Callable[[Any], None] | None:
        """A function that sends the activity's workflow signal `name` with one argument, and
        returns only once the engine has it (a signal is persisted in the workflow's history
        before its RPC returns); None without an engine client."""
        client, loop = self.client, self.loop
        if client is None or loop is None or not info.workflow_id:
            return None
        handle = client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)

        def send(arg: Any) -> None:
            fut = asyncio.run_coroutine_threadsafe(handle.signal(name, arg), loop)
            fut.result(timeout=30)

        return send

    def _anchored(self, info: activity.Info) -> list[list[dict[str, Any]]]:
        """The journals earlier attempts anchored, oldest first, read from the workflow's
        history (the engine alone: no worker, no query, needed)."""
        client, loop = self.client, self.loop
        if client is None or loop is None or not info.workflow_id:
            return []
        handle = client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)

        async def read() -> list[list[dict[str, Any]]]:
            found = []
            async for ev in handle.fetch_history_events():
                if not ev.HasField("workflow_execution_signaled_event_attributes"):
                    continue
                sig = ev.workflow_execution_signaled_event_attributes
                if sig.signal_name == ANCHOR and sig.input.payloads:
                    values = await client.data_converter.decode(sig.input.payloads)
                    if values and isinstance(values[0], list):
                        found.append(values[0])
            return found

        try:
            return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=60)
        except Exception as e:  # noqa: BLE001 - the heartbeat's journal still counts
            log.warning("cannot read the anchored journals of %s: %s", info.workflow_id, e)
            return []

    def _settle(
        self, config: Config, workload: str, earlier: list[list[dict[str, Any]]], attempt: int
    ) -> Report | None:
        """Finish or roll back what earlier attempts of this migration left (their journals,
        oldest first; and unfinished local journals of the workload); the newest outcome that
        changed something, or None if none did (then this attempt migrates)."""
        ids: list[str] = []
        for events in earlier:
            _materialize(config.state_dir, events)
            ids.append(str(events[0]["id"]))
        ids += [j.id for j in journal.summaries(config.state_dir)
                if j.status is None and j.workload == workload and j.id not in ids]  # fmt: skip
        outcome: Report | None = None
        for mid in ids:
            try:
                summary = journal.find(config.state_dir, mid)
            except ConfigError:
                continue  # never journaled: it had not begun
            if summary.status is not None:
                if summary.events[-1].get("recovered") and outcome is not None:
                    continue  # settled before, by an attempt that then went on
                r = Report(summary.id, summary.workload, summary.source, summary.destination,
                           summary.strategy, status=summary.status,
                           error=summary.events[-1].get("error"))  # fmt: skip
                r.notes.append(f"an earlier attempt had ended ({summary.status}) before its "
                               "worker could report it")  # fmt: skip
            else:
                r = self._recover(config, summary)
                r.notes.insert(0, f"an earlier attempt was cut off (its worker stopped "
                               f"heartbeating in {summary.last_phase or '-'}); settled by "
                               f"{self.identity} from its journal: {r.status}")  # fmt: skip
            if any("died in pre-flight" in n for n in r.notes):
                continue  # nothing was changed
            r.notes.append(f"run by worker {self.identity} (attempt {attempt})")
            outcome = r
        return outcome

    def _recover(self, config: Config, summary: journal.Summary) -> Report:
        """`migrate recover`: it takes the workload's lock on the source (and the journal), so
        if the previous attempt still runs (its worker lost the engine, not its hosts), this
        waits for a later retry instead of deciding under its feet."""
        try:
            report = recover(config, summary)
        except MigrationError as e:
            raise ApplicationError(f"recover {summary.id}: {e}") from None
        if journal.find(config.state_dir, summary.id).status is None:
            # recover decided to wait (a live migration holds the lock, a host that may hold
            # a copy cannot be asked): try again later, on this worker or another.
            raise ApplicationError(
                f"recover {summary.id} waits: {'; '.join(report.notes) or report.error}"
            )
        return report


def _busy(source: str, holder: str, why: str) -> ApplicationError:
    """The evacuation lock is held: BUSY (no retry), unless by this very workflow's earlier
    hold, whose worker died and whose connection is about to go (then retry: it frees)."""
    mine = holder.startswith(f"fleet evacuation {evacuate_id(source)} ")
    return ApplicationError(why, type=None if mine else BUSY, non_retryable=not mine)


def journal_events(record: Any) -> list[dict[str, Any]]:
    """A running migration's journal so far, as JSON records ([] for a dry run's, which
    records nothing); a torn last line (being written) is left out."""
    path = getattr(record, "path", None)
    if not isinstance(path, Path) or not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _candidates(previous: Any, anchored: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Earlier attempts' journals, one per migration id, oldest first: each the longest of
    what the last heartbeat carried and what was anchored (prefixes of the same journal: the
    heartbeat may lag or be lost, the anchor ends where the first phase after pre-flight
    begins)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    journals = list(anchored)
    if isinstance(previous, dict) and previous.get("journal"):
        journals.append(list(previous["journal"]))
    for events in journals:
        if not events or events[0].get("event") != "start" or not events[0].get("id"):
            continue
        mid = str(events[0]["id"])
        if len(events) > len(by_id.get(mid, [])):
            by_id[mid] = events
    return sorted(by_id.values(), key=lambda ev: ev[0].get("t") or 0)


def _materialize(state_dir: Path, events: list[dict[str, Any]]) -> None:
    """Write an earlier attempt's journal here, unless this controller has it already, as
    long and unfinished or finished (the same machine, or a shared state dir)."""
    mid = str(events[0]["id"])
    if "/" in mid:
        return
    path = state_dir / "journal" / f"{mid}.jsonl"
    if path.exists():
        mine = journal.summarize(path)
        if mine is None or mine.status is not None or len(mine.events) >= len(events):
            return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in events))
    tmp.replace(path)


class _Pulse:
    """What this attempt heartbeats: at first the previous attempt's details (so that, if this
    one dies while settling, the next still knows what to settle), then its own migration's."""

    def __init__(self, worker: str, attempt: int, previous: Any) -> None:
        self.lock = threading.Lock()
        base = dict(previous) if isinstance(previous, dict) else {}
        self.details: Callable[[], dict[str, Any]] = lambda: base | {
            "phase": "settle" if base else "start", "state": None,
            "worker": worker, "attempt": attempt,
        }  # fmt: skip

    def send(self) -> None:
        with self.lock:
            activity.heartbeat(self.details())


class _Heartbeat:
    """The running migration's heartbeat: id, phase, bytes, round, the journal so far."""

    def __init__(
        self,
        session: Session,
        pulse: _Pulse,
        anchor: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.session = session
        self.pulse = pulse
        self.worker = pulse.details()["worker"]
        self.attempt = pulse.details()["attempt"]
        self.anchor = anchor  # None: done (or not wanted)
        self.phase = "start"
        self.state: str | None = None
        self.final = False
        pulse.details = self.details
        if anchor is not None and not session.plan.dry_run:
            self._anchor_at_first_change(session.journal)

    def _anchor_at_first_change(self, record: Any) -> None:
        """Wrap this session's journal so that once the first phase after pre-flight is
        journaled as begun, and before it acts, the journal so far is anchored in the
        workflow, waited for: then it holds what recover needs (the root pid, and that the
        migration went past pre-flight) while nothing has changed on a host yet. Heartbeats
        are throttled and may be lost with the worker; this is not (and nothing is waited
        for later, inside any freeze). A failed anchor fails that phase: it rolls back."""
        write = record.write

        def anchored_write(event: str, **fields: Any) -> None:
            write(event, **fields)
            if (
                self.anchor is not None
                and event == "phase"
                and fields.get("state") == "begin"
                and fields.get("name") != "preflight"
            ):
                anchor, self.anchor = self.anchor, None
                try:
                    anchor(journal_events(record))
                except Exception as e:  # the engine did not answer: do not go on
                    raise MigrationError(
                        f"the engine did not take the journal before {fields.get('name')}: {e}"
                    ) from None

        record.write = anchored_write

    def details(self) -> dict[str, Any]:
        ctx = self.session.ctx
        record = self.session.journal
        return {
            "id": ctx.plan.id,
            "workload": ctx.plan.workload.name,
            "destination": ctx.plan.destination.name,
            "strategy": ctx.plan.strategy,
            "phase": "end" if self.final else self.phase,
            "state": self.state,
            "bytes": ctx.bytes_transferred,
            "round": progress.round_of(self.phase, ctx),
            "worker": self.worker,
            "attempt": self.attempt,
            "journal": journal_events(record) if FAULT != "lose-heartbeat-journal" else [],
        }

    def event(self, ev: progress.Event) -> None:
        self.phase, self.state = ev.phase, ev.status
        self.pulse.send()


class _Ticker:
    """Heartbeats every TICK seconds from a thread (long phases, pre-copy rounds, recover)."""

    def __init__(self, beat: Callable[[], None]) -> None:
        self.beat = beat
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Ticker:
        ctx = contextvars.copy_context()  # the activity's context: heartbeat works from there

        def loop() -> None:
            while not self.stop.wait(TICK):
                try:
                    ctx.run(self.beat)
                except Exception:  # a heartbeat must never break the migration
                    log.debug("heartbeat failed", exc_info=True)

        self.thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
