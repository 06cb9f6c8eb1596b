"""Pre-flight: read-only checks on both hosts before anything is frozen."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from orchestrator.criu import commands as criu
from orchestrator.criu.logs import error_lines
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context
from orchestrator.transport import rsync
from orchestrator.transport.ssh import Host, HostError

# Images are a little larger than the tree's resident memory; plus room for the small images.
IMAGE_OVERHEAD = 1.1
IMAGE_SLACK_KB = 16 * 1024

# What later strategies and live TCP rely on, as `criu check --feature` names them.
FEATURES = ("mem_dirty_track", "uffd-noncoop", "network_lock_nftables", "tcp_half_closed")
_HAS = 'c=$1; shift; for f; do "$c" check --feature "$f" >/dev/null 2>&1 && echo "$f"; done; true'
_HAS_CMD = 'for c; do command -v "$c" >/dev/null 2>&1 && echo "$c"; done; true'
_FREE_KB = 'd=$1; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d" | tail -n 1'


# CRIU's lazy page transfer asks for a ~3.2 MiB pipe; root without CAP_SYS_RESOURCE gets EPERM
# ("page-pipe: tee: 65536: Operation not permitted") unless fs.pipe-max-size allows it.
LAZY_PIPE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Needs:
    """What a strategy needs beyond the basics, checked before anything is frozen."""

    src_features: tuple[str, ...] = ()
    dst_features: tuple[str, ...] = ()
    pipe_max_bytes: int = 0  # fs.pipe-max-size on both hosts
    src_commands: tuple[str, ...] = ()  # programs the source must have
    dst_commands: tuple[str, ...] = ()  # programs the destination must have (#14)
    why: str = ""  # shown with any refusal, e.g. "post-copy"


@dataclass
class HostCheck:
    host: str
    criu_version: tuple[int, int, int] | None = None
    criu_ok: bool = False
    criu_error: str = ""
    rsync: bool = False
    free_kb: int = 0
    features: list[str] | None = None  # those of FEATURES this host's CRIU has (if asked)
    pipe_max: int = 0  # fs.pipe-max-size (if asked)
    missing: list[str] | None = None  # of the commands asked for, those the host lacks
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.criu_ok and self.rsync and self.criu_version is not None

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.criu_version is None:
            out.append(f"{self.host}: criu not found or unusable ({self.criu_error})")
        elif not self.criu_ok:
            out.append(f"{self.host}: `criu check` failed: {self.criu_error}")
        if not self.rsync:
            out.append(f"{self.host}: rsync is not installed")
        return out


def check_host(
    host: Host, features: bool = False, pipe: bool = False, commands: tuple[str, ...] = ()
) -> HostCheck:
    """The host half of pre-flight: reachable, CRIU usable, rsync present, free space; and
    with `features`, which CRIU features it has (one round trip); with `pipe`, the largest
    pipe it allows."""
    hc = HostCheck(host.name)
    try:
        host.connect()
        ver = host.run(criu.version(host.config.criu), mutates=False)
        hc.criu_version = criu.parse_version(ver.stdout + ver.stderr)
        hc.criu_error = ver.error_line() if not ver.ok else ""
        if hc.criu_version:
            chk = host.run(criu.check(host.config.criu), mutates=False)
            hc.criu_ok = chk.ok
            if not chk.ok:
                lines = error_lines(chk.stdout + "\n" + chk.stderr)
                hc.criu_error = lines[-1] if lines else chk.error_line()
        hc.rsync = host.run(["rsync", "--version"], mutates=False).ok
        free = host.run(["sh", "-c", _FREE_KB, "sh", host.config.workdir], mutates=False)
        fields = free.stdout.split()
        hc.free_kb = int(fields[3]) if free.ok and len(fields) > 3 and fields[3].isdigit() else 0
        if features and hc.criu_ok:
            has = host.run(["sh", "-c", _HAS, "sh", host.config.criu, *FEATURES], mutates=False)
            hc.features = has.stdout.split()
        if pipe:
            text = host.run(["cat", "/proc/sys/fs/pipe-max-size"], mutates=False).stdout.strip()
            hc.pipe_max = int(text) if text.isdigit() else 0
        if commands:
            have = host.run(["sh", "-c", _HAS_CMD, "sh", *commands], mutates=False).stdout.split()
            hc.missing = [c for c in commands if c not in have]
    except HostError as e:
        hc.error = str(e)
    return hc


def check_hosts(
    hosts: list[Host], features: bool = False, pipe: bool = False, needs: Needs | None = None
) -> list[HostCheck]:
    """check_host on every host at once (one connection each); the first host is the source."""
    cmds = needs.src_commands if needs else ()
    dst_cmds = needs.dst_commands if needs else ()  # #14
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        return list(
            pool.map(lambda h: check_host(h, features, pipe, cmds if h is hosts[0] else dst_cmds),
                     hosts)
        )  # fmt: skip


def unmet(needs: Needs, src: HostCheck, dst: HostCheck) -> list[str]:
    """Why these hosts cannot carry out a strategy with these needs (empty: they can)."""
    out = []
    for hc, wanted in ((src, needs.src_features), (dst, needs.dst_features)):
        missing = [f for f in wanted if f not in (hc.features or [])]
        if missing:
            out.append(
                f"{needs.why} needs CRIU feature {', '.join(missing)} on {hc.host}, which its "
                "kernel or CRIU lacks (`criu check --feature`)"
            )
    for hc in (src, dst):  # #14: dst too
        if hc.missing:
            out.append(f"{needs.why} needs {', '.join(hc.missing)} on {hc.host} (not installed)")
    for hc in (src, dst):
        if hc.pipe_max < needs.pipe_max_bytes:
            out.append(
                f"{needs.why} needs fs.pipe-max-size >= {needs.pipe_max_bytes} on {hc.host} "
                f"(it is {hc.pipe_max}): run `sysctl fs.pipe-max-size={needs.pipe_max_bytes}` "
                "there (scripts/setup-host does)"
            )
    return out


class Preflight(Phase):
    name = "preflight"

    def __init__(self, needs: Needs | None = None) -> None:
        self.needs = needs or Needs()

    def act(self, ctx: Context) -> None:
        needs = self.needs
        features = bool(needs.src_features or needs.dst_features)
        checks = check_hosts([ctx.src, ctx.dst], features, needs.pipe_max_bytes > 0, needs)
        problems = [p for c in checks for p in c.problems()]
        if not problems:
            problems = unmet(needs, checks[0], checks[1])
        if problems:
            raise MigrationError(problems[0], details=problems)
        src_v, dst_v = checks[0].criu_version, checks[1].criu_version
        assert src_v and dst_v
        if dst_v < src_v:
            raise MigrationError(
                f"criu on {ctx.dst.name} ({_v(dst_v)}) is older than on {ctx.src.name} "
                f"({_v(src_v)}): the destination must be at least as new"
            )
        if ctx.plan.strategy not in ctx.runtime.strategies:
            raise MigrationError(
                f"the {ctx.runtime.name} runtime cannot migrate with strategy "
                f"{ctx.plan.strategy} (it can: {', '.join(sorted(ctx.runtime.strategies))})"
            )
        target = ctx.runtime.locate(ctx.src)
        ctx.target = target
        if not ctx.plan.dry_run:
            holder = f"migration {ctx.plan.id} by {socket.gethostname()} pid {os.getpid()}"
            ctx.lock = ctx.src.lock(ctx.plan.lock_path(target.root_pid), holder)
        need_kb = int(target.rss_kb * IMAGE_OVERHEAD) + IMAGE_SLACK_KB
        if checks[1].free_kb < need_kb:
            raise MigrationError(
                f"not enough space on {ctx.dst.name} in {ctx.dst.config.workdir}: "
                f"{checks[1].free_kb // 1024} MiB free, images need ~{need_kb // 1024} MiB"
            )
        refusals = ctx.runtime.preflight(ctx.src, ctx.dst, target)
        if refusals:
            raise MigrationError(refusals[0], details=refusals)
        plan = ctx.plan
        probe = ctx.src.run(
            rsync.probe_argv(plan.source, plan.destination, plan.policy), mutates=False
        )
        if not probe.ok:
            raise MigrationError(
                f"{ctx.src.name} cannot reach {ctx.dst.name} over ssh for rsync: "
                f"{probe.error_line()}"
            )


def _v(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))
