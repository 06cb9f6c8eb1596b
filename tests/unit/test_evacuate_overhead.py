"""Evacuate's overhead outside the freeze, with fake hosts: host facts asked once per host for
the whole evacuation (not once per workload), and the next migration starting while the
previous one's confirm (kill, wipe) is still running."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from orchestrator import evacuate, facts, session, strategies
from orchestrator.config import Config, HostConfig, Policy, WorkloadConfig
from orchestrator.placement import Placement
from orchestrator.runtimes import procs
from orchestrator.transport.ssh import Result
from tests.unit.fakehost import FakeHost, healthy_host, script, words

POLICY = Policy(retries=1, retry_deadline=5)
HOSTS = {
    "a": HostConfig("a", "198.18.0.1", "/k", "/kh", workdir="/wa"),
    "b": HostConfig("b", "198.18.0.2", "/k", "/kh", workdir="/wb"),
}


def pid_of(i: int) -> int:
    return 100 + 10 * i


class Fleet:
    """Every Host a session opens is a FakeHost on one shared log; workload i is pid 100+10i
    (its own start time) on a; b says it restored pid 100 each time."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.log: list[tuple[str, list[str]]] = []
        self.restored: list[bool] = []
        self.hosts: list[FakeHost] = []
        self.on_new: list = []  # callbacks given each new FakeHost

    def __call__(self, config: HostConfig, policy: Policy, **kw: object) -> FakeHost:
        h = FakeHost(config, policy, log=self.log, **kw)  # type: ignore[arg-type]
        healthy_host(h, self.restored)
        ps = "".join(f"{pid_of(i)} 1 Ss 2048 /bin/sh /w{i}.sh\n{pid_of(i) + 1} {pid_of(i)} S "
                     f"1024 sleep 1\n" for i in range(self.n))  # fmt: skip
        if h.name == "a":  # (b shows pid 100's tree once a restore ran: healthy_host)
            h.on(words("ps", "-ww", "-e"), ps)
        h.answer(lambda a: Result(h.name, a, 0, f"NSpid:\t{a[-1]}\npid same\nmnt same\nnet same\n"
                                  f"start {a[-1]}\nflags 0\n")
                 if script(procs._NS_SCRIPT)(a) else None)  # fmt: skip
        for cb in self.on_new:
            cb(h)
        self.hosts.append(h)
        return h

    def facts_asked(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for host, argv in self.log:
            if script(facts.SCRIPT)(argv):
                out[host] = out.get(host, 0) + 1
        return out


Setup = tuple[Config, Fleet, evacuate.Survey]


def setup(tmp_path: Path, n: int, monkeypatch: pytest.MonkeyPatch) -> Setup:
    wls = {f"w{i}": WorkloadConfig(f"w{i}", pid=pid_of(i), host="a") for i in range(n)}
    cfg = Config(tmp_path / "m.yaml", HOSTS, wls, POLICY, tmp_path / "state")
    fleet = Fleet(n)
    monkeypatch.setattr(session, "Host", fleet)
    s = evacuate.Survey("a", ["b"], wls, placement=Placement({name: "b" for name in wls}))
    return cfg, fleet, s


@pytest.mark.parametrize("strategy", ["stopcopy", "auto"])
def test_facts_are_asked_once_per_host_for_the_whole_evacuation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    cfg, fleet, s = setup(tmp_path, 5, monkeypatch)
    # auto asks for features too; none of them here: it settles on stop-copy
    fleet.on_new.append(lambda h: h.lacking.update(strategies.FEATURES))
    reports = evacuate.evacuate(cfg, s, evacuate.Options(parallel=1, strategy=strategy))
    assert [r.status for r in reports] == ["succeeded"] * 5, [r.error for r in reports]
    assert [h.name for h in fleet.hosts] == ["a", "b"]  # one connection per host for all
    assert fleet.facts_asked() == {"a": 1, "b": 1}
    assert {r.strategy for r in reports} == {"stopcopy"}


def test_a_host_whose_facts_failed_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, fleet, s = setup(tmp_path, 3, monkeypatch)
    left = [1]  # b's first answer is cut short; its later ones are whole

    def flaky(h: FakeHost) -> None:
        def cut(argv: list[str]) -> Result | None:
            if h.name == "b" and left and script(facts.SCRIPT)(argv):
                left.pop()
                return Result(h.name, argv, 255, "@@migrate-fact criu-version\n")
            return None

        h.answer(cut)

    fleet.on_new.append(flaky)
    reports = evacuate.evacuate(cfg, s, evacuate.Options(parallel=1, strategy="stopcopy"))
    assert [r.status for r in reports] == ["failed", "succeeded", "succeeded"]
    assert "incomplete host facts" in (reports[0].error or "")
    assert fleet.facts_asked() == {"a": 1, "b": 2}


def test_the_next_migration_starts_while_the_previous_confirm_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--parallel 1: w0's confirm is held at its kill until w1 has begun (its source lock
    taken); without the slot given back at confirm, this would wait forever (bounded here)."""
    cfg, fleet, s = setup(tmp_path, 2, monkeypatch)
    w1_locked = threading.Event()
    held: list[bool] = []

    def gate(h: FakeHost) -> None:
        def watch(argv: list[str]) -> None:
            if argv[:1] == ["lock"] and argv[1].endswith(f"pid-{pid_of(1)}.lock"):
                w1_locked.set()
            if argv[:2] == ["kill", "-KILL"] and argv[2] == str(pid_of(0)):
                held.append(w1_locked.wait(timeout=20))

        h.watchers.append(watch)

    fleet.on_new.append(gate)
    monkeypatch.setattr(FakeHost, "lock", _logged_lock(fleet))
    reports = evacuate.evacuate(cfg, s, evacuate.Options(parallel=1, strategy="stopcopy"))
    assert [r.status for r in reports] == ["succeeded", "succeeded"], [r.error for r in reports]
    assert held == [True]
    # ...and never two migrations before their confirm: w1 began once w0's confirm had
    order = [f"{a[0]} {a[-1] if a[0] == 'lock' else a[2]}" for _, a in fleet.log
             if a[:1] == ["lock"] or a[:2] == ["kill", "-KILL"]]  # fmt: skip
    assert order == ["lock /wa/locks/pid-100.lock", "kill 100", "lock /wa/locks/pid-110.lock",
                     "kill 110"]  # fmt: skip


def _logged_lock(fleet: Fleet):  # type: ignore[no-untyped-def]
    real = FakeHost.lock

    def lock(self: FakeHost, path: str, holder: str):  # type: ignore[no-untyped-def]
        got = real(self, path, holder)
        for w in self.watchers:
            w(["lock", path])
        return got

    return lock


def test_the_survey_locates_on_one_connection_per_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, fleet, _ = setup(tmp_path, 9, monkeypatch)
    monkeypatch.setattr(evacuate, "Host", fleet)
    fleet.on_new.append(lambda h: h.on(words("cat", "/proc/meminfo"), "MemAvailable: 8000000 kB\n"))
    gone = WorkloadConfig("gone", pid=999, host="a")
    cfg = dataclasses.replace(cfg, workloads={**cfg.workloads, "gone": gone})
    s = evacuate.survey(cfg, "a", ["b"])
    assert sorted(s.rss_kb) == [f"w{i}" for i in range(9)]
    assert set(s.rss_kb.values()) == {3072}  # each tree: 2048 + 1024 kB
    assert list(s.missing) == ["gone"] and "pid 999 is not running on a" in s.missing["gone"]
    assert sorted(s.placement.assigned) == sorted(s.rss_kb)
    assert sorted(h.name for h in fleet.hosts) == ["a", "b"]  # one connection to each
    assert s.shared is not None
    s.close()
