"""Pre-flight: read-only checks on both hosts before anything is frozen."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from orchestrator.criu import commands as criu
from orchestrator.criu.logs import error_lines
from orchestrator.errors import MigrationError
from orchestrator.phases import precopy
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
_FREE_KB = 'd=$1; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d" | tail -n 1'


@dataclass
class HostCheck:
    host: str
    criu_version: tuple[int, int, int] | None = None
    criu_ok: bool = False
    criu_error: str = ""
    rsync: bool = False
    free_kb: int = 0
    features: list[str] | None = None  # those of FEATURES this host's CRIU has (if asked)
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


def check_host(host: Host, features: bool = False) -> HostCheck:
    """The host half of pre-flight: reachable, CRIU usable, rsync present, free space; and
    with `features`, which CRIU features it has (one round trip)."""
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
    except HostError as e:
        hc.error = str(e)
    return hc


def check_hosts(hosts: list[Host], features: bool = False) -> list[HostCheck]:
    """check_host on every host at once (one connection each)."""
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        return list(pool.map(lambda h: check_host(h, features), hosts))


class Preflight(Phase):
    name = "preflight"

    def act(self, ctx: Context) -> None:
        checks = check_hosts([ctx.src, ctx.dst])
        problems = [p for c in checks for p in c.problems()]
        if problems:
            raise MigrationError(problems[0], details=problems)
        src_v, dst_v = checks[0].criu_version, checks[1].criu_version
        assert src_v and dst_v
        if dst_v < src_v:
            raise MigrationError(
                f"criu on {ctx.dst.name} ({_v(dst_v)}) is older than on {ctx.src.name} "
                f"({_v(src_v)}): the destination must be at least as new"
            )
        if ctx.plan.strategy == "precopy":
            reason = precopy.refusal(ctx)
            if reason:
                raise MigrationError(reason)
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
