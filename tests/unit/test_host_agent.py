"""How Host turns its agent's answers into results and errors (the agent itself runs for real
in tests/integration/test_agent.py)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config import HostConfig, Policy
from orchestrator.transport.agent import AgentLost, AgentTimeout
from orchestrator.transport.ssh import Host, HostError


class StubAgent:
    """Answers every request with the next of `answers` (or raises it)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.alive = True
        self.closed = False

    def call(self, op: str, wait: float, /, **args: Any) -> dict[str, Any]:
        self.asked.append((op, args))
        a = self.answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return dict(a)

    def local(self, t: float) -> float:
        return t - 1000.0

    def close(self) -> None:
        self.closed = True


class StubTransport:
    saved_exception = None

    def is_active(self) -> bool:
        return True


class StubConnection:
    transport = StubTransport()  # alive: connect() keeps it

    def close(self) -> None:
        pass


def host_with(agent: StubAgent) -> Host:
    h = Host(HostConfig("a", "198.18.0.1", "/k", "/kh"), Policy(command_timeout=7))
    h._conn = StubConnection()  # type: ignore[assignment]  # connected: connect() does nothing
    h._agent = agent  # type: ignore[assignment]
    return h


def test_a_command_goes_to_the_agent_with_its_umask_and_stamps(monkeypatch: Any) -> None:
    agent = StubAgent({"rc": 0, "out": "hi\n", "err": "", "started": 1001.0, "ended": 1002.5})
    h = host_with(agent)
    monkeypatch.setattr(Host, "close", lambda self: None)
    r = h.run(["criu", "dump", "x y"], private=True)
    assert r.ok and r.stdout == "hi\n" and (r.started, r.ended) == (1.0, 2.5)
    op, args = agent.asked[0]
    assert op == "run" and args["argv"] == ["criu", "dump", "x y"] and args["umask"] == 0o077
    assert args["timeout"] == 7


def test_a_signal_is_an_exit_code_like_a_shell_gives() -> None:
    h = host_with(StubAgent({"rc": -9, "out": "", "err": "", "started": 0, "ended": 0}))
    assert h.run(["sleep", "1"]).exit_code == 137


def test_a_timeout_is_an_error_naming_the_kill() -> None:
    h = host_with(StubAgent({"rc": -9, "out": "", "err": "", "started": 0, "ended": 0,
                             "timed_out": True}))  # fmt: skip
    with pytest.raises(HostError, match=r"timed out after 7s \(killed\): criu restore"):
        h.run(["criu", "restore"])


@pytest.mark.parametrize("failure", [AgentLost("gone"), AgentTimeout("wedged")])
def test_a_lost_or_wedged_agent_drops_the_connection(failure: Exception) -> None:
    agent = StubAgent(failure)
    h = host_with(agent)
    with pytest.raises(HostError):
        h.run(["criu", "dump"])  # mutating: never repeated
    assert agent.closed and h._conn is None


def test_a_read_is_repeated_after_a_lost_agent(monkeypatch: Any) -> None:
    agent = StubAgent(AgentLost("gone"), {"rc": 0, "out": "S\n", "err": "", "started": 0,
                                          "ended": 0})  # fmt: skip
    h = host_with(agent)
    # after the drop, the next attempt reconnects: here, to the same stub
    monkeypatch.setattr(Host, "connect", lambda self: setattr(self, "_agent", agent))
    monkeypatch.setattr(Host, "close", lambda self: None)
    assert h.run(["ps", "-o", "stat="], mutates=False).stdout == "S\n"


def test_sockets_need_an_agent() -> None:
    h = Host(HostConfig("a", "198.18.0.1", "/k", "/kh"), Policy(agent=False))
    h._conn = object()  # type: ignore[assignment]
    with pytest.raises(HostError, match="needs the host's agent"):
        h.run(["criu", "dump"], sockets={"@t": "/x.sock"})
