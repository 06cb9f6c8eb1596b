"""The lines of a CRIU log worth showing an operator."""

from __future__ import annotations

import re

from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host, Result

# Printed on every run where root lacks CAP_SYS_RESOURCE; not an error.
NOISE = (
    re.compile(r"rlimit: Can't setup RLIMIT_NOFILE"),
    re.compile(r"Error: ipv[46]: [Aa]ddress already assigned"),
    # LXC's tools, on every restore: their first command reaches a monitor not up yet.
    re.compile(r"Failed to receive (response|file descriptors for command)"),
)
# LXC's tools (lxc-checkpoint's stderr): "lxc-TOOL: NAME: ../src/lxc/FILE.c: FUNC: LINE MESSAGE".
_LXC = re.compile(r"^lxc-[\w-]+: .*?(?:\.\./)?src/lxc/(\S+: \w+: \d+ .*)$")
_ERROR = re.compile(r"\b(Error|BUG)\b|^Error|Can't |Unable to", re.IGNORECASE)
_PREFIX = re.compile(r"^\(\s*[\d.]+\)\s*")
_PULLED = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")
PAGE_SIZE = 4096


# Lines that only say that something failed, not why (CRIU's summaries of a failure).
_SUMMARY = re.compile(
    r"(Dumping|Restoring|Pre-dumping|Dump|Restore) (FAILED|failed)|exited, status=|"
    r"killed by signal|Failed to (dump|restore|checkpoint)|"
    r"Restoring \S+ failed|restore process died|Failed to execute criu|criu process exited|"
    r"dump failed with|criu output:",
    re.IGNORECASE,
)


def cause(lines: list[str]) -> str | None:
    """The first error in causal order (CRIU logs the cause first, then its echoes and a
    summary such as "Restoring FAILED"): the first line that is not a mere summary."""
    return next((ln for ln in lines if not _SUMMARY.search(ln)), lines[0] if lines else None)


def error_lines(log: str, limit: int | None = 6) -> list[str]:
    """CRIU's own error lines from a log (the last `limit`; None: all), without timestamps and
    known noise."""
    found = []
    for raw in log.splitlines():
        line = _PREFIX.sub("", raw.strip())
        if not line or any(n.search(line) for n in NOISE):
            continue
        lxc = _LXC.match(line)
        if lxc:  # every line LXC's tools print on stderr is an error
            found.append(lxc.group(1))
        elif _ERROR.search(line) and not line.lower().startswith("warn"):
            found.append(line)
    return found if limit is None else found[-limit:]


def pages_pulled(log: str) -> tuple[int, int]:
    """(pages pulled, pages expected) over all tasks, from a `criu lazy-pages` log."""
    pulled = expected = 0
    for m in _PULLED.finditer(log):
        pulled += int(m.group(1))
        expected += int(m.group(2))
    return pulled, expected


def raise_on_failure(host: Host, result: Result, images_dir: str, log: str, what: str) -> None:
    """Raise with CRIU's own error lines from its log on that host when a CRIU run failed."""
    if result.ok:
        return
    text = host.run(["cat", "--", f"{images_dir}/{log}"], mutates=False).stdout
    every = error_lines(text, None) or error_lines(result.stderr, None) or [result.error_line()]
    raise MigrationError(
        f"criu {what} failed on {host} (exit {result.exit_code}): {cause(every)}",
        details=every[-6:],  # the tail, as before
    )
