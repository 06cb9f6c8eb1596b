"""The host half of pre-flight on many hosts at once (one round trip each: orchestrator.facts),
a cache of it for the migrations of one evacuation, and what a strategy's needs lack on a pair
of hosts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from orchestrator.facts import HostFacts, gather
from orchestrator.strategies import FEATURES, TABLE, Needs
from orchestrator.transport.ssh import Host

# Images are a little larger than the tree's resident memory; plus room for the small images.
IMAGE_OVERHEAD = 1.1
IMAGE_SLACK_KB = 16 * 1024


@contextmanager
def asking(workers: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for read-only questions to hosts. On the way out they are waited for, but not
    after an interrupt (Ctrl-C): a connect that hangs would hold it until its timeout (the
    CLI then exits at once; nothing they do changes a host)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        yield pool
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# Every program any strategy wants on a host: what a cached host's facts are asked about.
ALL_COMMANDS = tuple(dict.fromkeys(
    c for s in TABLE.values() for c in (*s.needs.src_commands, *s.needs.dst_commands)))  # fmt: skip


class FactsCache:
    """Host facts asked once per host (every CRIU feature and program any strategy needs) and
    reused by every migration of one evacuation: its pre-flights, and `auto`'s choice. Facts
    with an error are not kept (the next migration asks again). Thread-safe: migrations run
    in parallel; a host is asked by one of them while the others wait for its answer.

    Free space is as it was when first asked: each pre-flight checks its own images against
    it, as before (parallel migrations to one host do not add up theirs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._facts: dict[str, HostFacts] = {}
        self._asking: dict[str, threading.Lock] = {}
        self.asked: dict[str, int] = {}  # round trips made, per host

    def get(self, host: Host) -> HostFacts:
        with self._lock:
            turn = self._asking.setdefault(host.name, threading.Lock())
        with turn:
            with self._lock:
                known = self._facts.get(host.name)
            if known is not None:
                return known
            got = gather(host, FEATURES, ALL_COMMANDS)
            with self._lock:
                self.asked[host.name] = self.asked.get(host.name, 0) + 1
                if not got.error:
                    self._facts[host.name] = got
            return got


def check_hosts(
    hosts: list[Host],
    features: bool = False,
    needs: Needs | None = None,
    cache: FactsCache | None = None,
) -> list[HostFacts]:
    """Each host's facts (one connection each, all at once; from `cache` if given); the first
    host is the source, the others asked for the programs `needs` wants on the destination."""
    if cache is not None:
        with asking(min(8, len(hosts))) as pool:
            return list(pool.map(cache.get, hosts))
    asked = FEATURES if features else ()
    src_cmds = needs.src_commands if needs else ()
    dst_cmds = needs.dst_commands if needs else ()
    with asking(min(8, len(hosts))) as pool:
        return list(
            pool.map(lambda h: gather(h, asked, src_cmds if h is hosts[0] else dst_cmds), hosts)
        )


def unmet(needs: Needs, why: str, src: HostFacts, dst: HostFacts) -> list[str]:
    """Why these hosts cannot carry out a strategy with these needs (empty: they can)."""
    out = []
    for hc, wanted in ((src, needs.src_features), (dst, needs.dst_features)):
        missing = hc.lacks_features(wanted)
        if missing:
            out.append(
                f"{why} needs CRIU feature {', '.join(missing)} on {hc.host}, which its "
                "kernel or CRIU lacks (`criu check --feature`)"
            )
    for hc, cmds in ((src, needs.src_commands), (dst, needs.dst_commands)):
        lacking = hc.lacks_commands(cmds)
        if lacking:
            out.append(f"{why} needs {', '.join(lacking)} on {hc.host} (not installed)")
    for hc in (src, dst):
        if hc.pipe_max < needs.pipe_max_bytes:
            out.append(
                f"{why} needs fs.pipe-max-size >= {needs.pipe_max_bytes} on {hc.host} "
                f"(it is {hc.pipe_max}): run `sysctl fs.pipe-max-size={needs.pipe_max_bytes}` "
                "there (scripts/setup-host does)"
            )
    return out
