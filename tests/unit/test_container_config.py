"""Container workloads in the config (lxc, runc, podman), and the commands their runtimes build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import strategies
from orchestrator.config import ConfigError, HostConfig, Policy, WorkloadConfig, load
from orchestrator.errors import MigrationError
from orchestrator.runtimes import for_workload
from orchestrator.runtimes.base import Target
from orchestrator.runtimes.lxc import LxcRuntime
from orchestrator.runtimes.podman import PodmanRuntime
from orchestrator.runtimes.runc import RuncRuntime
from tests.unit.fakehost import FakeHost


def config(tmp_path: Path, workload: dict[str, Any]) -> Path:
    key = tmp_path / "id"
    key.write_text("k")
    data = {
        "hosts": {"a": {"address": "198.18.0.1", "key": str(key), "known_hosts": str(key)}},
        "workloads": {"w": workload},
    }
    path = tmp_path / "migrate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("runtime", ["lxc", "runc", "podman"])
def test_a_container_workload_loads(tmp_path: Path, runtime: str) -> None:
    wl = load(config(tmp_path, {"runtime": runtime, "container": "web-1.a_b"})).workload("w")
    assert (wl.runtime, wl.container) == (runtime, "web-1.a_b")
    assert type(for_workload(wl)).name == runtime


@pytest.mark.parametrize(
    ("workload", "expect"),
    [
        ({"runtime": "runc"}, "w.container: required for runtime runc"),
        ({"runtime": "lxc", "container": "-P/etc"}, "bad container name '-P/etc'"),
        ({"runtime": "lxc", "container": "../../etc"}, "bad container name"),
        ({"runtime": "podman", "container": "a;reboot"}, "bad container name"),
        ({"runtime": "podman", "container": "a b"}, "bad container name"),
        ({"runtime": "runc", "container": ".hidden"}, "bad container name"),
        ({"runtime": "runc", "container": "x" * 64}, "bad container name"),
        ({"runtime": "runc", "container": 7}, "container: must be a string"),
        ({"runtime": "runc", "container": "c", "pid": 5}, "w.pid: a runc workload is found by"),
        ({"runtime": "lxc", "container": "c", "bundle": "/b"}, "w.bundle: only for runtime runc"),
        ({"runtime": "runc", "container": "c", "bundle": "rel"}, "bundle: must be an absolute"),
        ({"runtime": "runc", "container": "c", "runc_root": "/a/../b"}, "without '..'"),
        ({"runtime": "lxc", "container": "c", "lxcpath": "/a\nb"}, "lxcpath: not a usable path"),
        ({"runtime": "podman", "container": "c", "podman_root": "x"}, "podman_root: must be"),
        ({"pid": 5, "container": "c"}, "container: only for runtime lxc, runc or podman"),
    ],
)
def test_hostile_or_wrong_container_keys_are_refused(
    tmp_path: Path, workload: dict[str, Any], expect: str
) -> None:
    path = config(tmp_path, workload)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert expect in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def host(criu: str = "criu") -> FakeHost:
    cfg = HostConfig(name="a", address="198.18.0.1", key="k", known_hosts="k", criu=criu)
    return FakeHost(cfg, Policy())


def test_runtime_commands_use_the_configured_paths_and_criu() -> None:
    h = host("/opt/criu/bin/criu")
    runc = RuncRuntime(WorkloadConfig("w", runtime="runc", container="c", runc_root="/r"))
    assert runc.runc(h) == ["runc", "--root", "/r", "--criu", "/opt/criu/bin/criu"]
    pod = PodmanRuntime(WorkloadConfig("w", runtime="podman", container="c", podman_root="/s",
                                       podman_runroot="/t"))  # fmt: skip
    assert pod.podman(h, "ps") == [
        "podman", "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--root", "/s",
        "--runroot", "/t", "--runtime-flag", "criu=/opt/criu/bin/criu", "ps",
    ]  # fmt: skip
    lxc = LxcRuntime(WorkloadConfig("w", runtime="lxc", container="c"))
    assert lxc.lxc("lxc-info", "-s") == ["lxc-info", "-P", "/var/lib/lxc", "-n", "c", "-s"]
    # Defaults: runc's own root, criu from PATH.
    default = RuncRuntime(WorkloadConfig("w", runtime="runc", container="c"))
    assert default.runc(host()) == ["runc", "--root", "/run/runc"]


@pytest.mark.parametrize("runtime", ["lxc", "runc", "podman"])
def test_container_runtimes_carry_out_stopcopy_only(runtime: str) -> None:
    """Their own checkpoint makes one full dump: pre-flight refuses any other strategy."""
    rt = for_workload(WorkloadConfig("w", runtime=runtime, container="c"))
    assert rt.capabilities == frozenset()
    can = [s.name for s in strategies.TABLE.values() if s.needs.runtime <= rt.capabilities]
    assert can == ["stopcopy"]


def answering(replies: dict[tuple[str, ...], tuple[int, str]]) -> FakeHost:
    """A fake host whose commands holding all the words of a key answer (exit code, stdout)."""
    h = host()
    for words, (code, out) in replies.items():
        h.on(lambda argv, w=words: all(x in argv for x in w), out=out, code=code)
    return h


def test_missing_runtime_or_container_is_one_clear_line() -> None:
    rt = RuncRuntime(WorkloadConfig("w", runtime="runc", container="web"))
    no_runc = answering({("sh", "runc"): (1, "")})
    with pytest.raises(MigrationError, match=r"^runc is not installed on a \(198.18.0.1\)$"):
        rt.locate(no_runc)
    no_container = answering({("state", "web"): (1, "")})
    with pytest.raises(MigrationError, match="runc container web does not exist on a"):
        rt.locate(no_container)
    target = Target(root_pid=5, pids=[5], rss_kb=1, command="sh")
    assert rt.preflight(no_runc, no_runc, target) == ["runc is not installed on a (198.18.0.1)"]


def test_runc_refuses_a_regular_file_as_stdio() -> None:
    rt = RuncRuntime(WorkloadConfig("w", runtime="runc", container="web"))
    src = answering({("5",): (0, "0 /dev/null\n1 /var/log/web.log\n2 pipe:[42]\n")})
    problems = rt.more_preflight(src, host(), Target(root_pid=5, pids=[5], rss_kb=1, command=""))
    assert len(problems) == 1 and "fd 1 is the file /var/log/web.log" in problems[0]


def test_podman_wants_the_base_image_on_the_destination() -> None:
    rt = PodmanRuntime(WorkloadConfig("w", runtime="podman", container="web"))
    src = answering({("inspect",): (0, "exited 0 localhost/base:1\n")})
    dst = answering({("image", "exists"): (1, "")})
    target = Target(root_pid=5, pids=[5], rss_kb=1, command="")
    [problem] = rt.more_preflight(src, dst, target)
    assert "podman image localhost/base:1" in problem and "is not on a" in problem
    assert rt.more_preflight(src, host(), target) == []
