"""The lines of a CRIU log worth showing an operator."""

from __future__ import annotations

import re

from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host, Result

# Printed on every run where root lacks CAP_SYS_RESOURCE; not an error.
NOISE = (
    re.compile(r"rlimit: Can't setup RLIMIT_NOFILE"),
    re.compile(r"Error: ipv4: Address already assigned"),
)
_ERROR = re.compile(r"\b(Error|BUG)\b|^Error|Can't |Unable to", re.IGNORECASE)
_PREFIX = re.compile(r"^\(\s*[\d.]+\)\s*")
_PULLED = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")
PAGE_SIZE = 4096


def error_lines(log: str, limit: int = 6) -> list[str]:
    """CRIU's own error lines from a log (last `limit`), without timestamps and known noise."""
    found = []
    for raw in log.splitlines():
        line = _PREFIX.sub("", raw.strip())
        if not line or any(n.search(line) for n in NOISE):
            continue
        if _ERROR.search(line) and not line.lower().startswith("warn"):
            found.append(line)
    return found[-limit:]


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
    lines = error_lines(text) or error_lines(result.stderr) or [result.error_line()]
    raise MigrationError(
        f"criu {what} failed on {host} (exit {result.exit_code}): {lines[-1]}", details=lines
    )
