"""What an evacuation's migrations share, with stubs: one host's views (Host.share) on one
connection, opened again once it ended; answers asked once (Host.once); the shared ssh link
master (opened once, checked when not seen lately, opened again when gone); the masters per
source and destination (Shared.master)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator import session
from orchestrator.config import Config, HostConfig, Policy, WorkloadConfig
from orchestrator.plan import Plan, new_id
from orchestrator.transport import link as linkmod
from orchestrator.transport.ssh import Host
from tests.unit.fakehost import FakeHost

A = HostConfig("a", "198.18.0.1", "/k", "/kh", workdir="/wa")
B = HostConfig("b", "198.18.0.2", "/k", "/kh", workdir="/wb")


class StubTransport:
    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.saved_exception = None

    def is_active(self) -> bool:
        return self.active


class StubConnection:
    def __init__(self, active: bool = True) -> None:
        self.transport = StubTransport(active)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_views_share_the_connection_and_only_the_host_closes_it() -> None:
    h = Host(A, Policy(agent=False))
    conn = StubConnection()
    h._conn = conn  # type: ignore[assignment]
    planned: list[str] = []
    v = h.share(dry_run=True, planned=planned)
    assert v._conn is conn and v.shared and not h.shared
    assert v.dry_run and not h.dry_run and v.planned is planned and v.notes is not h.notes
    v.close()
    assert not conn.closed and h._conn is conn  # a view leaves it to the others
    v.drop(conn=StubConnection())  # (not the one in use: another view's old one)
    assert h._conn is conn
    h.close()
    assert conn.closed and v._conn is None


def test_an_ended_connection_is_opened_again_once(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Host(A, Policy(agent=False))
    dead = StubConnection(active=False)
    h._conn = dead  # type: ignore[assignment]
    opened: list[StubConnection] = []

    def open_(self: Host) -> StubConnection:
        opened.append(StubConnection())
        return opened[-1]

    monkeypatch.setattr(Host, "_open", open_)
    views = [h.share(), h.share()]
    for v in views:
        v.connect()
    assert dead.closed and len(opened) == 1 and all(v._conn is opened[0] for v in views)


def test_an_answer_is_asked_once_for_all_views_unless_refused() -> None:
    h = Host(A, Policy())
    asked: list[str] = []

    def ask(answer: str | None) -> Any:
        return lambda: asked.append("x") or answer

    keep = lambda why: why is None  # noqa: E731
    assert h.once("cpu", ask(None), keep) is None
    assert h.share().once("cpu", ask("refused"), keep) is None  # kept: not asked again
    assert h.share().once("other", ask("refused"), keep) == "refused"
    assert h.once("other", ask("refused"), keep) == "refused"  # not kept: asked again
    assert len(asked) == 3
    assert Host(A, Policy()).once("cpu", ask("x"), keep) == "x"  # another host: its own


def master_on(host: FakeHost) -> linkmod.Master:
    spec = Plan(new_id(), WorkloadConfig("w", pid=1), A, B, "stopcopy", Policy()).link_spec
    m = linkmod.Master.for_pair(spec, "evac-abc123-0")
    assert m is not None and m.spec.socket == "/wa/images/ssh-evac-abc123-0"
    return m


def ran(host: FakeHost) -> list[str]:
    """Which of the link commands (mkdir, open, check, exit) host ran, in order."""
    out = []
    for _, argv in host.log:
        text = " ".join(argv)
        if "mkdir" in text:
            out.append("mkdir")
        elif "ControlMaster=yes" in text:
            out.append("open")
        for op in ("check", "exit"):
            if f"-O {op}" in text:
                out.append(op)
    return out


def test_a_shared_master_is_opened_once_checked_when_not_seen_lately_and_reopened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = FakeHost(A, Policy())
    m = master_on(src)
    now = [100.0]
    monkeypatch.setattr(linkmod.time, "monotonic", lambda: now[0])
    for _ in range(3):  # the first migration's probe opens it; then it was seen just now
        m.link(src.share()).probe()
        m.link(src.share()).open()
    assert ran(src) == ["mkdir", "open"]
    now[0] += linkmod.FRESH + 1  # not seen lately: asked, and it is there
    m.link(src.share()).open()
    now[0] += 1
    m.link(src.share()).open()
    assert ran(src) == ["mkdir", "open", "check"]
    now[0] += linkmod.FRESH + 1  # gone (ControlPersist ended it): opened again
    src.on(lambda argv: "-O" in argv and "check" in argv, code=255)
    m.link(src.share()).open()
    assert ran(src) == ["mkdir", "open", "check", "check", "mkdir", "open"]
    link = m.link(src.share())
    link.close()  # a migration's close leaves it to the others
    assert ran(src)[-1] == "open"
    m.close(src)
    m.close(src)
    assert ran(src)[-1] == "exit" and ran(src).count("exit") == 1


def test_a_socket_path_too_long_means_no_shared_master() -> None:
    long = HostConfig("a", "198.18.0.1", "/k", "/kh", workdir="/w" + "x" * 100)
    spec = Plan(new_id(), WorkloadConfig("w", pid=1), long, B, "stopcopy", Policy()).link_spec
    assert linkmod.Master.for_pair(spec, "evac-abc123-0") is None


@pytest.mark.parametrize(("parallel", "masters"), [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_each_pair_has_a_master_per_four_migrations_at_once(
    tmp_path: Path, parallel: int, masters: int
) -> None:
    cfg = Config(tmp_path / "m.yaml", {"a": A, "b": B}, {}, Policy(), tmp_path / "state")
    shared = session.Shared(cfg)
    shared.share_among(parallel)
    wl = WorkloadConfig("w", pid=1)
    used = [shared.master(Plan(new_id(), wl, A, B, "stopcopy", Policy())) for _ in range(12)]
    back = shared.master(Plan(new_id(), wl, B, A, "stopcopy", Policy()))
    assert len({id(m) for m in used}) == masters and back not in used
    assert used[:masters] == used[masters : 2 * masters]  # in turn
    assert shared.master(Plan(new_id(), wl, A, B, "stopcopy", Policy(), dry_run=True)) is None
    assert shared.host("a") is shared.host("a") and shared.view("a", False, []).shared
