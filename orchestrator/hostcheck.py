"""The host half of pre-flight on many hosts at once (one round trip each: orchestrator.facts),
and what a strategy's needs lack on a pair of hosts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from orchestrator.facts import HostFacts, gather
from orchestrator.strategies import FEATURES, Needs
from orchestrator.transport.ssh import Host

# Images are a little larger than the tree's resident memory; plus room for the small images.
IMAGE_OVERHEAD = 1.1
IMAGE_SLACK_KB = 16 * 1024


def check_hosts(
    hosts: list[Host], features: bool = False, needs: Needs | None = None
) -> list[HostFacts]:
    """Each host's facts (one connection each, all at once); the first host is the source,
    the others asked for the programs `needs` wants on the destination."""
    asked = FEATURES if features else ()
    src_cmds = needs.src_commands if needs else ()
    dst_cmds = needs.dst_commands if needs else ()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts)))) as pool:
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
