"""The source's ssh link to the destination, as one object: open before the freeze, probe,
forward a page port through it, push images and paths over it (rsync, retried while the link
is what failed), close. Commands run on the source; the link counts what it moved."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator.errors import MigrationError
from orchestrator.transport import rsync
from orchestrator.transport.rsync import LinkSpec
from orchestrator.transport.ssh import Host, Result, retrying


@dataclass
class Link:
    spec: LinkSpec
    src: Host  # the source host: every link command runs there
    notes: list[str] = field(default_factory=list)  # retries, for the report
    bytes_sent: int = 0  # by rsync, in all
    seconds: float = 0.0  # spent in rsync

    @property
    def log(self) -> str | None:
        return f"{self.spec.socket}.log" if self.spec.socket else None

    def open(self) -> None:
        """Open the master connection (no-op without a control socket)."""
        if not self.spec.socket or not self.log:
            return
        r = self.src.run(rsync.open_argv(self.spec, self.log))
        if not r.ok:
            raise MigrationError(
                f"{self.src.name} cannot open its ssh link to {self.spec.destination.name}: "
                f"{r.error_line()}"
            )

    def probe(self) -> None:
        """The source reaches the destination the way rsync will (read-only)."""
        r = self.src.run(rsync.probe_argv(self.spec), mutates=False)
        if not r.ok:
            raise MigrationError(
                f"{self.src.name} cannot reach {self.spec.destination.name} over ssh for "
                f"rsync: {r.error_line()}"
            )

    def forward(self, forward: str) -> Result:
        """Carry `forward` (ssh -L's LOCAL:REMOTE) inside the master connection."""
        if not self.spec.socket:
            raise MigrationError(
                f"a page channel needs an ssh link from {self.src.name}, and the control "
                f"socket path under {self.spec.source.workdir} is too long: use a shorter workdir"
            )
        return self.src.run(rsync.forward_argv(self.spec, forward))

    def cancel(self, forward: str) -> None:
        if self.spec.socket:
            self.src.run(rsync.forward_argv(self.spec, forward, cancel=True))

    def push(
        self,
        src_dir: str,
        dst_dir: str,
        mirror: bool = False,
        around: Callable[[list[str]], list[str]] | None = None,
    ) -> str:
        """rsync src_dir on the source into dst_dir on the destination (inside `around`'s
        command, if given: e.g. checksums made while it sends); the command's output (rsync's
        --stats in it: rsync.bytes_sent)."""
        argv = rsync.push_argv(self.spec, src_dir, dst_dir, mirror=mirror)
        what = f"rsync {src_dir if mirror else ''} {self.src.name} -> {self.spec.destination.name}"
        return self._rsync(around(argv) if around else argv, " ".join(what.split()))

    def push_paths(self, paths: Sequence[str]) -> int:
        """Each absolute path to the same path on the destination; the bytes sent."""
        if not paths:
            return 0
        what = f"rsync of sync_paths {self.src.name} -> {self.spec.destination.name}"
        return rsync.bytes_sent(self._rsync(rsync.paths_argv(self.spec, paths), what))

    def close(self) -> None:
        """Close the master connection and remove its log (best effort)."""
        if self.spec.socket and self.log:
            self.src.run(rsync.close_argv(self.spec))
            self.src.run(["rm", "-f", "--", self.log])

    def _rsync(self, argv: list[str], what: str) -> str:
        """Run one rsync on the source, retried while the link is what failed (rsync resumes:
        --partial); its output (the bytes it sent are counted)."""
        t0 = time.monotonic()
        try:
            for attempt in retrying(self.spec.policy, what, (rsync.LinkError,), self.notes):
                with attempt:
                    r = self.src.run(argv)
                    if not r.ok:
                        raise rsync.failure(r.exit_code, r.stderr or r.stdout, what)
                    self.bytes_sent += rsync.bytes_sent(r.stdout)
                    return r.stdout
        finally:
            self.seconds += time.monotonic() - t0
        raise AssertionError("unreachable: retrying re-raises the last error")
