"""The strategy table: for each strategy, what it needs of the hosts and the runtime, which
phases run, how the final dump's pages travel, and where its point of no return is.

One row per strategy, as libvirt's qemuMigrationParamsFlagMap has one per flag: `auto`,
pre-flight, the phase list, recover and the report read this table and nothing else names a
strategy. Strategies never talk SSH themselves.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from orchestrator.checkpoint import Capability, Pages
from orchestrator.config import ConfigError, Policy

# CRIU feature names (`criu check --feature`) strategies and live TCP rely on.
DIRTY_TRACKING = "mem_dirty_track"  # soft-dirty: pre-copy rounds
USERFAULTFD = "uffd-noncoop"  # post-copy's lazy restore
NFT_LOCK = "network_lock_nftables"
TCP_REPAIR = "tcp_half_closed"
FEATURES = (DIRTY_TRACKING, USERFAULTFD, NFT_LOCK, TCP_REPAIR)

# CRIU's lazy page transfer asks for a ~3.2 MiB pipe; root without CAP_SYS_RESOURCE gets EPERM
# ("page-pipe: tee: 65536: Operation not permitted") unless fs.pipe-max-size allows it.
LAZY_PIPE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Needs:
    """What a strategy needs beyond the basics, checked in pre-flight before any freeze."""

    src_features: tuple[str, ...] = ()
    dst_features: tuple[str, ...] = ()
    pipe_max_bytes: int = 0  # fs.pipe-max-size on both hosts
    src_commands: tuple[str, ...] = ()  # programs the source must have
    dst_commands: tuple[str, ...] = ()  # programs the destination must have
    runtime: frozenset[Capability] = frozenset()

    @property
    def features(self) -> bool:
        return bool(self.src_features or self.dst_features)


@dataclass(frozen=True)
class Strategy:
    name: str
    title: str  # as said to people, e.g. "post-copy"
    doc: str
    phases: tuple[str, ...]  # phase names, in order (orchestrator.phases.build makes them)
    needs: Needs
    pages: Pages  # how the final dump's pages travel
    rounds: bool = False  # pre-copy rounds before the freeze (final dump in a subdir)
    #: The phase whose success makes rollback impossible: the destination copy runs and the
    #: source's memory has diverged (confirm; for post-copy already its restore).
    no_return: str = "confirm"
    postcopy: bool = False  # needs the policy's allow_postcopy to be picked by `auto`

    @property
    def lazy(self) -> bool:
        return self.pages is Pages.LAZY

    @property
    def pages_on_source(self) -> bool:
        """Whether the source writes the pages to its disk (as files, or in pre-copy rounds):
        its workdir needs room for them, not only for the small images."""
        return self.pages is Pages.FILES or self.rounds


_COPY = ("image-pipe", "dump", "transfer", "restore", "verify")
_LAZY = ("image-pipe", "lazy-dump", "transfer", "lazy-restore", "pull-pages", "verify")
# python3: the page channel's helper on both hosts (criu/pagechannel.py); on the source also
# to unlock a rolled-back workload's TCP sockets (runtimes/net.py).
PY = ("python3",)
_POSTCOPY = Needs(
    dst_features=(USERFAULTFD,),
    pipe_max_bytes=LAZY_PIPE_BYTES,
    runtime=frozenset({Capability.LAZY_PAGES}),
    src_commands=PY,
    dst_commands=PY,
)

TABLE: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "stopcopy", "stop-copy",
            "Freeze, dump everything, copy, restore: the freeze grows with memory size.",
            ("preflight", "prepare", *_COPY, "confirm"),
            Needs(), Pages.FILES,
        ),
        Strategy(
            "stream", "stream",
            "Like stop-copy, but the dump streams pages straight to a page server on the "
            "destination through the source's ssh link; only small images are rsynced.",
            ("preflight", "prepare", "page-server", *_COPY, "confirm"),
            Needs(runtime=frozenset({Capability.PAGE_SERVER}), src_commands=PY, dst_commands=PY),
            Pages.PAGE_SERVER,
        ),
        Strategy(
            "precopy", "pre-copy",
            "Rounds of pre-dumps while the workload runs (each sends only the pages dirtied "
            "since the one before) until the stop rule says freeze; the final dump is small.",
            ("preflight", "prepare", "rounds", *_COPY, "final-round", "confirm"),
            Needs(src_features=(DIRTY_TRACKING,), runtime=frozenset({Capability.PRE_DUMP})),
            Pages.FILES, rounds=True,
        ),
        Strategy(
            "postcopy", "post-copy",
            "Freeze, move only the small images, run on the destination at once; memory "
            "follows on demand and in the background. No rollback once the destination runs.",
            ("preflight", "prepare", "page-tunnel", *_LAZY, "confirm"),
            _POSTCOPY, Pages.LAZY, no_return="lazy-restore", postcopy=True,
        ),
        Strategy(
            "hybrid", "hybrid (pre-copy, then post-copy)",
            "Pre-copy rounds while the workload runs, then post-copy for what they left: the "
            "freeze moves no pages, and fewer are left to pull after the destination resumes.",
            ("preflight", "prepare", "rounds", "page-tunnel", *_LAZY, "final-round", "confirm"),
            Needs(src_features=(DIRTY_TRACKING,), dst_features=_POSTCOPY.dst_features,
                  pipe_max_bytes=LAZY_PIPE_BYTES, src_commands=_POSTCOPY.src_commands,
                  dst_commands=_POSTCOPY.dst_commands,
                  runtime=frozenset({Capability.PRE_DUMP, Capability.LAZY_PAGES})),
            Pages.LAZY, rounds=True, no_return="lazy-restore", postcopy=True,
        ),
    )
}  # fmt: skip
CHOICES = ("auto", *TABLE)
#: What `auto` tries, best first: post-copy kinds only when the policy allows them (like
#: libvirt's --postcopy: they cannot roll back once the destination runs); then pre-copy,
#: which can, and whose freeze moves only the last dirty pages; stop-copy always works.
#: Stream before stop-copy: the same rollback, and its freeze is shorter at every size measured
#: (pages go straight into the destination while the dump runs; docs/bench).
AUTO_ORDER = ("hybrid", "postcopy", "precopy", "stream", "stopcopy")


def get(name: str) -> Strategy:
    """The row for a strategy name (ConfigError naming the known ones)."""
    if name not in TABLE:
        raise ConfigError(f"unknown strategy {name!r} (known: {', '.join(CHOICES)})")
    return TABLE[name]


def resolve(name: str) -> str:
    """Check a requested strategy name (`auto` is settled later, by `choose`)."""
    return name if name == "auto" else get(name).name


#: What a workload may hold that only some strategies can carry: file locks (the source copy
#: must let go of them, and come back from its own images on a rollback: not stream's, which
#: lack the pages) and TCP connections in the host's network (locked at the dump: not for
#: post-copy, which keeps the source frozen until every page is pulled).
FILE_LOCKS = "file locks"
HOST_TCP = "TCP connections in the host's network"


def unmet_by(
    s: Strategy,
    policy: Policy,
    src_features: Collection[str],
    dst_features: Collection[str],
    runtime_can: Collection[Capability],
    commands: Collection[str] = (),
    holds: Collection[str] = (),
) -> str | None:
    """Why `auto` cannot pick s here (None: it can); `commands`: those both hosts have;
    `holds`: what of FILE_LOCKS, HOST_TCP the workload holds."""
    if s.postcopy and not policy.allow_postcopy:
        return "post-copy is not allowed by policy (allow_postcopy)"
    carried = {Pages.LAZY: (), Pages.PAGE_SERVER: (HOST_TCP,)}.get(s.pages, (FILE_LOCKS, HOST_TCP))
    cannot = [h for h in holds if h not in carried]
    if cannot:
        return f"the workload holds {' and '.join(cannot)}"
    lacking = sorted({*s.needs.src_commands, *s.needs.dst_commands} - set(commands))
    if lacking:
        return f"it needs {', '.join(lacking)} on both hosts"
    missing_caps = s.needs.runtime - set(runtime_can)
    if missing_caps:
        return f"this runtime cannot do {', '.join(sorted(c.value for c in missing_caps))}"
    for side, have, wanted in (("source", src_features, s.needs.src_features),
                               ("destination", dst_features, s.needs.dst_features)):  # fmt: skip
        missing = [f for f in wanted if f not in have]
        if missing:
            return f"the {side}'s kernel or CRIU lacks {', '.join(missing)}"
    return None


def choose(policy: Policy, src_features: Collection[str], dst_features: Collection[str],
           runtime_can: Collection[Capability], commands: Collection[str] = (),
           holds: Collection[str] = ()) -> tuple[str, str]:  # fmt: skip
    """What `auto` means for these hosts (and this workload): (strategy name, why)."""
    passed: list[str] = []
    for name in AUTO_ORDER:
        s = TABLE[name]
        why_not = unmet_by(s, policy, src_features, dst_features, runtime_can, commands, holds)
        if why_not is None:
            said = f" ({'; '.join(passed)})" if passed else ""
            return name, f"auto: {s.title}{said}"
        passed.append(f"not {s.title}: {why_not}")
    raise AssertionError("stop-copy needs nothing: it is always possible")
