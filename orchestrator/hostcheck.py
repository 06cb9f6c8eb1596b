"""The host half of pre-flight: reachable, CRIU usable, rsync present, free space, CRIU
features, pipe size, needed programs; read-only, on many hosts at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from orchestrator.criu import commands as criu
from orchestrator.criu.logs import error_lines
from orchestrator.strategies import FEATURES, Needs
from orchestrator.transport.ssh import Host, HostError

# Images are a little larger than the tree's resident memory; plus room for the small images.
IMAGE_OVERHEAD = 1.1
IMAGE_SLACK_KB = 16 * 1024

_HAS = 'c=$1; shift; for f; do "$c" check --feature "$f" >/dev/null 2>&1 && echo "$f"; done; true'
_HAS_CMD = 'for c; do command -v "$c" >/dev/null 2>&1 && echo "$c"; done; true'
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
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        return list(
            pool.map(lambda h: check_host(h, features, pipe, cmds if h is hosts[0] else ()), hosts)
        )


def unmet(needs: Needs, why: str, src: HostCheck, dst: HostCheck) -> list[str]:
    """Why these hosts cannot carry out a strategy with these needs (empty: they can)."""
    out = []
    for hc, wanted in ((src, needs.src_features), (dst, needs.dst_features)):
        missing = [f for f in wanted if f not in (hc.features or [])]
        if missing:
            out.append(
                f"{why} needs CRIU feature {', '.join(missing)} on {hc.host}, which its "
                "kernel or CRIU lacks (`criu check --feature`)"
            )
    if src.missing:
        out.append(f"{why} needs {', '.join(src.missing)} on {src.host} (not installed)")
    for hc in (src, dst):
        if hc.pipe_max < needs.pipe_max_bytes:
            out.append(
                f"{why} needs fs.pipe-max-size >= {needs.pipe_max_bytes} on {hc.host} "
                f"(it is {hc.pipe_max}): run `sysctl fs.pipe-max-size={needs.pipe_max_bytes}` "
                "there (scripts/setup-host does)"
            )
    return out
