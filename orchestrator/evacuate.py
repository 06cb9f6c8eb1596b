"""Evacuate a host: move every workload placed on it to other hosts, a few at a time.

Which workloads: those whose last successful migration ended on the host, and those the
config places there (`host:`) that have not been moved since. Each one is located on the
source (its RSS), the destinations are asked for their free memory (/proc/meminfo
MemAvailable), and placement (orchestrator.placement) picks a destination for each. Then each
workload takes the ordinary single-migration path (orchestrator.session) in its own thread,
with its own journal, images, lock and undo. One failing workload never stops the others.

Outside the freeze, the evacuation spares each migration what it can (orchestrator.session.
Shared, made by the survey and closed when the evacuation ends): one connection and agent per
host for the survey and every migration, one ssh link master per source and destination, the
hosts' facts asked once per host; and `--parallel N` bounds the migrations in flight up to
their confirm: once a workload runs verified on its destination, the next one starts while the
first one's source is killed and images wiped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.config import Config, ConfigError, WorkloadConfig
from orchestrator.errors import MigrationError
from orchestrator.hostcheck import FactsCache, asking
from orchestrator.location import whereabouts, workloads_on
from orchestrator.phases.confirm import Confirm
from orchestrator.placement import Bin, Item, Placement, mem_available_kb, place
from orchestrator.progress import Event, Sink, listener
from orchestrator.report import PhaseResult, Report
from orchestrator.runtimes import for_workload
from orchestrator.session import Shared, open_session
from orchestrator.transport.ssh import Host, HostError, LockBusy, RemoteLock

log = logging.getLogger("migrate")


@dataclass
class Survey:
    """What evacuating source means now: the workloads, their sizes, and where each goes."""

    source: str
    destinations: list[str]
    workloads: dict[str, WorkloadConfig]  # as found on the source (pid as it is now)
    rss_kb: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # could not be located: why
    placement: Placement = field(default_factory=Placement)
    # The connections the survey used, for the evacuation to go on with (it closes them).
    shared: Shared | None = field(default=None, repr=False, compare=False)
    # The source's evacuation lock (survey(..., lock=True)): held until close().
    lock: RemoteLock | None = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        """Close the survey's connections (evacuate() does, when it is done with them), which
        frees the evacuation lock too."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.shared is not None:
            self.shared.close()
            self.shared = None


class EvacuationBusy(MigrationError):
    """Another evacuation of the same host runs (its controller holds the host's lock, and
    wrote `holder` into it)."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


def evacuation_lock(workdir: str) -> str:
    """The source's lock for evacuating it: one evacuation of a host at a time."""
    return f"{workdir.rstrip('/')}/locks/evacuate.lock"


def select(config: Config, source: str, only: list[str]) -> dict[str, WorkloadConfig]:
    """The workloads on source, or just those named in `only` (each must be there)."""
    here = workloads_on(config, source)
    if not only:
        return here
    where = whereabouts(config)
    for name in only:
        if name not in config.workloads:
            raise ConfigError(f"--only {name}: no such workload in {config.path}")
        if name not in here:
            now = where[name][0] if name in where else "no host"
            raise ConfigError(f"--only {name}: it is not on {source} (it is on {now})")
    return {n: here[n] for n in sorted(set(only))}


def survey(
    config: Config,
    source: str,
    destinations: list[str],
    only: list[str] | None = None,
    lock: bool = False,
) -> Survey:
    """Locate the source's workloads, read the destinations' room, and place (read-only).
    With lock, first take the source's evacuation lock (held by its agent until the survey's
    connections close: a controller that dies frees it), or raise EvacuationBusy naming the
    evacuation that holds it: two evacuations of one host would fight over its workloads and
    overfill destinations each placed on alone."""
    src_cfg = config.host(source)
    dests = destinations or [h for h in config.hosts if h != source]
    for d in dests:
        config.host(d)
        if d == source:
            raise ConfigError(f"--to {d}: the destination cannot be the host being evacuated")
    if not dests:
        raise ConfigError(f"no destination: the config has no host besides {source}")
    s = Survey(source, list(dict.fromkeys(dests)), select(config, source, only or []))
    s.shared = Shared(config)
    try:
        if lock:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            holder = f"evacuation by {socket.gethostname()} pid {os.getpid()} since {since}"
            s.lock = take_lock(s.shared.host(source), src_cfg.workdir, holder)
        with asking(len(s.destinations)) as pool:
            rooms = [pool.submit(room, config, d, s.shared.host(d)) for d in s.destinations]
            src = s.shared.host(source)  # meanwhile, locate
            for name, found in locate_all(src, s.workloads).items():
                if isinstance(found, int):
                    s.rss_kb[name] = found
                else:
                    s.missing[name] = found
            bins = [b for b in (f.result() for f in rooms) if b is not None]
    except BaseException:
        s.close()
        raise
    items = [Item(n, kb) for n, kb in s.rss_kb.items()]
    s.placement = place(items, bins)
    if not s.placement.assigned:  # nothing will migrate: nothing to keep the connections for
        s.close()
    return s


def take_lock(src: Host, workdir: str, holder: str) -> RemoteLock:
    """The source's evacuation lock, held for holder (local: the survey; fleet: the workflow's
    hold activity, so each mode refuses the other too), or EvacuationBusy naming its holder."""
    try:
        return src.lock(evacuation_lock(workdir), holder)
    except LockBusy as e:
        raise EvacuationBusy(
            f"{src.name} is being evacuated already ({e.holder}): wait for it to end (its "
            "lock frees itself if that controller dies)",
            e.holder,
        ) from None


# Workloads located at once on the source (each takes a few round trips; the host's agent
# runs overlapping requests).
SURVEY_CONNECTIONS = 4


def locate_all(src: Host, workloads: dict[str, WorkloadConfig]) -> dict[str, int | str]:
    """Each workload's RSS (kB) on src, or why it cannot be found there; a few at once, each
    thread locating every n-th workload (in name order in the result)."""
    names = list(workloads)
    n = max(1, min(SURVEY_CONNECTIONS, len(names)))

    def part(i: int) -> dict[str, int | str]:
        out: dict[str, int | str] = {}
        for name in names[i::n]:
            try:
                out[name] = for_workload(workloads[name]).locate(src).rss_kb
            except (MigrationError, HostError) as e:
                out[name] = str(e)
        return out

    found: dict[str, int | str] = {}
    with asking(n) as pool:
        for got in pool.map(part, range(n)):
            found |= got
    return {name: found[name] for name in names}


def room(config: Config, name: str, shared: Host | None = None) -> Bin | None:
    """A destination's room: MemAvailable, its capacity, and the RSS of what already runs
    there (over `shared`, left open, if given; else a connection of its own)."""
    hc = config.host(name)
    host = shared or Host(hc, config.policy)
    try:
        meminfo = host.run(["cat", "/proc/meminfo"], mutates=False)
        if not meminfo.ok:
            log.warning("%s: cannot read /proc/meminfo: %s", name, meminfo.error_line())
            return None
        used = 0
        for wl in workloads_on(config, name).values():
            try:
                used += for_workload(wl).locate(host).rss_kb
            except (MigrationError, HostError):
                continue  # not running there: it takes no room
        capacity = hc.capacity_mb * 1024 if hc.capacity_mb is not None else None
        return Bin(name, mem_available_kb(meminfo.stdout), capacity, used)
    except HostError as e:
        log.warning("%s: unreachable, not a destination: %s", name, e)
        return None
    finally:
        if shared is None:
            host.close()


@dataclass(frozen=True)
class Options:
    parallel: int = 1
    strategy: str = "auto"
    dry_run: bool = False
    keep_images: bool = False


def failed(survey_: Survey, name: str, why: str, dest: str = "-") -> Report:
    """The report of a workload that never started migrating."""
    return Report(id="-", workload=name, source=survey_.source, destination=dest,
                  strategy="-", error=why)  # fmt: skip


def evacuate(
    config: Config,
    s: Survey,
    opts: Options,
    sink: Sink | None = None,
    stop: threading.Event | None = None,
    facts: FactsCache | None = None,
) -> list[Report]:
    """Migrate each placed workload (at most opts.parallel at once before their confirm); one
    report per workload, in name order. Workloads that could not be located or placed are
    reported as failed. The migrations share the survey's connections (s.shared, else their
    own Shared) and close them at the end; `facts`: the hosts' facts, asked once (the
    Shared's, if not given)."""
    shared = s.shared or Shared(config)
    s.shared = None  # closed here, whatever happens (the evacuation lock with it)
    try:
        return _evacuate(config, s, opts, shared, sink, stop, facts)
    finally:
        s.close()
        shared.close()


def _evacuate(
    config: Config,
    s: Survey,
    opts: Options,
    shared: Shared,
    sink: Sink | None,
    stop: threading.Event | None,
    facts: FactsCache | None,
) -> list[Report]:
    reports: dict[str, Report] = {}
    for name, why in s.missing.items():
        reports[name] = failed(s, name, why)
    for name, why in s.placement.unplaced.items():
        reports[name] = failed(s, name, f"not placed: {why}")
    stop = stop or threading.Event()
    parallel = max(1, opts.parallel)
    shared.share_among(parallel, facts)
    slots = threading.Semaphore(parallel)  # migrations in flight, until their confirm begins

    def one(name: str, dest: str) -> Report:
        with slots_until_confirm(slots) as slot:
            if stop.is_set():
                report = failed(s, name, "not started: the evacuation was interrupted", dest)
            else:
                try:
                    session = open_session(
                        config, name, s.source, dest, strategy=opts.strategy,
                        dry_run=opts.dry_run, keep_images=opts.keep_images,
                        workload_config=s.workloads[name], shared=shared,
                    )  # fmt: skip
                    inner = listener(session.ctx, sink) if sink else None
                    report = session.run(slot.wrap(inner))
                except (MigrationError, ConfigError) as e:
                    report = failed(s, name, str(e), dest)
        if sink:
            sink(Event(name, dest, "end", report.status, report.bytes_transferred))
        return report

    # Twice the threads: up to `parallel` confirms finish while as many migrations run.
    with ThreadPoolExecutor(max_workers=2 * parallel) as pool:
        futures: dict[str, Future[Report]] = {
            name: pool.submit(one, name, dest) for name, dest in s.placement.assigned.items()
        }
        for name, fut in futures.items():
            try:
                reports[name] = fut.result()
            except KeyboardInterrupt:
                stop.set()  # no new migration starts; those running finish (or roll back)
                reports[name] = fut.result()
            except Exception as e:  # a bug in one worker must not take the others down
                log.exception("evacuate %s: unexpected error (a bug)", name)
                reports[name] = failed(s, name, f"unexpected error: {e}")
    return [reports[n] for n in sorted(reports)]


Listen = Callable[[str, PhaseResult | None], None]


class _Slot:
    """One migration's place among the `--parallel` in flight, given back (once) when its
    confirm begins, or when it ends without one."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self._slots, self._held = slots, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()

    def wrap(self, inner: Listen | None) -> Listen:
        """A runner listener that gives the slot back as confirm begins, then calls inner."""

        def listen(phase: str, result: PhaseResult | None) -> None:
            if phase == Confirm.name and result is None:
                self.release()
            if inner is not None:
                inner(phase, result)

        return listen


@contextmanager
def slots_until_confirm(slots: threading.Semaphore) -> Iterator[_Slot]:
    """Wait for a place among the migrations in flight; it is given back at confirm or at
    the end, whichever comes first."""
    slots.acquire()
    slot = _Slot(slots)
    try:
        yield slot
    finally:
        slot.release()


def exit_code(reports: list[Report]) -> int:
    """0 only if every workload moved; else the worst: 4 if any is stranded (post-copy failed
    after the destination ran), 1 if any failed, 3 if the rest rolled back."""
    if all(r.status == "succeeded" for r in reports):
        return 0
    for status, code in (("stranded", 4), ("failed", 1)):
        if any(r.status == status for r in reports):
            return code
    return 3
