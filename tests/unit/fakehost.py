"""A recording fake Host for unit tests of pure logic (never the proof that CRIU works).

It subclasses the real Host and replaces only the wire: quoting and the dry-run gate are real.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.criu import manifest
from orchestrator.transport.ssh import Host, RemoteLock, Result

Responder = Callable[[list[str]], Result | None]


@dataclass
class FakeHost(Host):
    log: list[tuple[str, str]] = field(default_factory=list)  # share one list: global order
    responders: list[Responder] = field(default_factory=list)

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def lock(self, path: str, holder: str) -> RemoteLock:
        self.log.append((self.name, f"lock {path}"))
        return _FakeLock(self, path)

    def _execute(self, argv: list[str], line: str, timeout: float) -> Result:
        argv = manifest.pushed(argv)  # #14: the final push is rsync inside a checking script
        self.log.append((self.name, " ".join(argv)))
        for responder in self.responders:
            r = responder(argv)
            if r is not None:
                return r
        return Result(self.name, argv, 0)


class _FakeLock(RemoteLock):
    def __init__(self, host: FakeHost, path: str) -> None:
        self.host, self.path = host, path

    def release(self) -> None:
        self.host.log.append((self.host.name, f"unlock {self.path}"))
