"""The source's ssh link to the destination, as one object: open before the freeze, probe,
forward a page port through it, push images and paths over it (rsync, retried while the link
is what failed), close. Commands run on the source; the link counts what it moved.

The migrations of one evacuation share a master per source and destination (Master): probed
and opened once, checked before each migration takes it, closed when the evacuation ends. Each
migration's forwards (the page channel's, the image pipe's) still name its own sockets, in its
own images dir."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from orchestrator.errors import MigrationError
from orchestrator.layout import SOCKET_MAX, make_private_dir
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
    master: Master | None = None  # shared with other migrations (then spec.socket is its)
    opened: bool = False  # this migration's own master is open (by the probe or open())

    @property
    def log(self) -> str | None:
        return f"{self.spec.socket}.log" if self.spec.socket else None

    def open(self) -> None:
        """Open the master connection (no-op without a control socket); a shared one is
        checked, and opened again if it went."""
        if self.master is not None:
            self.master.take(self.src)
            return
        if self.opened or not self.spec.socket or not self.log:
            return
        _open(self.src, self.spec)
        self.opened = True

    def probe(self, open_master: bool = False) -> None:
        """The source reaches the destination the way rsync will. With open_master (not in
        a dry run), the probe is the opening of the master connection that open() would make
        later: one ssh handshake instead of two; a failed opening leaves nothing behind. Else
        read-only. A shared master's opening is its probe (once for all migrations)."""
        if self.master is not None:
            self.master.take(self.src)
            return
        if open_master and self.spec.socket and self.log:
            make_private_dir(self.src, self.spec.socket.rsplit("/", 1)[0])
            try:
                _open(self.src, self.spec)
            except MigrationError:
                self.src.run(["rm", "-f", "--", self.log])
                raise
            self.opened = True
            return
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
        """Close the master connection and remove its log (best effort); a shared one stays
        for the other migrations (its owner closes it)."""
        if self.master is None and self.spec.socket and self.log:
            _close(self.src, self.spec)
            self.opened = False

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


def _open(src: Host, spec: LinkSpec) -> None:
    assert spec.socket
    r = src.run(rsync.open_argv(spec, f"{spec.socket}.log"))
    if not r.ok:
        raise MigrationError(
            f"{src.name} cannot open its ssh link to {spec.destination.name}: {r.error_line()}"
        )


def _check_argv(spec: LinkSpec) -> list[str]:
    """Run on the source: is the master connection there? (read-only)"""
    return [*rsync.ssh_command(spec), "-O", "check", spec.destination.address]


def _close(src: Host, spec: LinkSpec) -> None:
    src.run(rsync.close_argv(spec))
    src.run(["rm", "-f", "--", f"{spec.socket}.log"])


#: Seconds a shared master seen open is taken as open without asking (ssh's ControlPersist,
#: rsync.open_argv, keeps an idle one 60 s: a migration taking it has ample time to use it).
FRESH = 10.0


@dataclass
class Master:
    """A master connection from a source to a destination that several migrations share (an
    evacuation's): opened by the first to probe, checked (`ssh -O check`) before each takes it
    and opened again if it went (ControlPersist ends an idle one), closed by close()."""

    spec: LinkSpec  # its socket: under the source's images dir (0700), named by no migration
    opened: bool = False
    seen: float = float("-inf")  # when it was last known to be open (time.monotonic())
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def for_pair(cls, spec: LinkSpec, tag: str) -> Master | None:
        """A shared master for spec's hosts, its socket named by tag; None if the socket path
        would be too long (each migration then opens its own link, as alone)."""
        images = f"{spec.source.workdir.rstrip('/')}/images"
        socket = f"{images}/ssh-{tag}"
        return cls(replace(spec, socket=socket)) if len(socket) <= SOCKET_MAX else None

    def link(self, src: Host) -> Link:
        """A migration's link over this master (src: that migration's view of the source)."""
        return Link(self.spec, src, master=self)

    def take(self, src: Host) -> None:
        """The master is open (opened now if it was not, or went): MigrationError if it
        cannot be (the source cannot reach the destination over ssh)."""
        with self._lock:
            now = time.monotonic()
            if self.opened and now - self.seen < FRESH:
                return  # a master seen open lives on for ControlPersist (60 s) at least
            if self.opened and src.run(_check_argv(self.spec), mutates=False).ok:
                self.seen = now
                return
            assert self.spec.socket
            make_private_dir(src, self.spec.socket.rsplit("/", 1)[0])
            _open(src, self.spec)
            self.opened, self.seen = True, now

    def close(self, src: Host) -> None:
        """Close it (best effort; the owner, once every migration is done)."""
        with self._lock:
            if self.opened:
                self.opened = False
                _close(src, self.spec)
