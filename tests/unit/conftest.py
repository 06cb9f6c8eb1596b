"""Unit tests never open a socket: any TCP/UDP socket made, or any socket connected, fails the
test, even when the code under test catches the error (it is recorded and reported at the
end of the test). Paramiko and Fabric reach the network only through these calls."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

_INET = (socket.AF_INET, socket.AF_INET6)


class NetworkAccess(BaseException):
    """Raised on a network attempt in a unit test. A BaseException, so that code under test
    that handles connection errors (`except Exception`, `except OSError`) does not absorb it."""


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


@pytest.fixture(autouse=True)
def no_network(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[list[str]]:
    """Refuse sockets for the length of each unit test; yields the attempts seen."""
    attempts: list[str] = []

    def refuse(what: str) -> None:
        attempts.append(what)
        raise NetworkAccess(f"unit tests do not use the network: {what}")

    real_init = socket.socket.__init__

    def init(self: socket.socket, family: Any = -1, type: Any = -1, *a: Any, **kw: Any) -> None:
        fileno = kw.get("fileno", a[1] if len(a) > 1 else None)
        if family in _INET or (family == -1 and fileno is None):
            refuse(
                f"socket({socket.AddressFamily(family if family != -1 else socket.AF_INET).name})"
            )
        real_init(self, family, type, *a, **kw)

    def connect(self: socket.socket, address: Any) -> None:
        refuse(f"connect to {address!r}")

    def connect_ex(self: socket.socket, address: Any) -> int:
        refuse(f"connect_ex to {address!r}")
        return 1

    def create_connection(address: Any, *a: Any, **kw: Any) -> socket.socket:
        refuse(f"create_connection to {address!r}")
        raise AssertionError("unreachable")

    monkeypatch.setattr(socket.socket, "__init__", init)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield attempts
    if attempts and not request.node.stash.get(_CALL_FAILED, False):  # else: already failed
        pytest.fail(
            "a unit test tried to use the network (even if the code under test carried on): "
            + "; ".join(attempts),
            pytrace=False,
        )
