"""Config validation: every error is one line naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "id"
    known = tmp_path / "known_hosts"
    key.write_text("k")
    known.write_text("")
    return {"key": str(key), "known_hosts": str(known)}


def write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "migrate.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def good(keys: dict[str, str]) -> dict:
    return {
        "hosts": {
            "host-a": {"address": "198.18.0.1", **keys},
            "host-b": {"address": "198.18.0.2", "port": 2222, **keys},
        },
        "workloads": {"counter": {"pidfile": "/run/c.pid", "criu_options": ["--shell-job"]}},
        "policy": {"retries": 5, "command_timeout": 30},
    }


def test_good_config_loads(tmp_path: Path, keys: dict[str, str]) -> None:
    cfg = load(write(tmp_path, good(keys)))
    assert cfg.host("host-b").port == 2222
    assert cfg.host("host-a").criu == "criu"
    assert cfg.workload("counter").locator == ("pidfile", "/run/c.pid")
    assert cfg.workload("counter").criu_options == ("--shell-job",)
    assert cfg.policy.retries == 5 and cfg.policy.command_timeout == 30.0
    assert cfg.workload("pid:1234").pid == 1234
    assert cfg.workload("pidfile:/run/x.pid").pidfile == "/run/x.pid"
    assert (cfg.policy.max_downtime_ms, cfg.policy.goal, cfg.policy.max_iterations) == (500, 20, 8)
    assert cfg.workload("counter").sync_paths == ()


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d["hosts"]["host-a"].update(adress="x"), "hosts.host-a.adress: unknown key"),
        (lambda d: d["hosts"]["host-a"].pop("address"), "hosts.host-a.address: missing"),
        (lambda d: d["hosts"]["host-a"].update(port="22"), "hosts.host-a.port: must be an integer"),
        (lambda d: d["hosts"]["host-a"].update(port=True), "hosts.host-a.port: must be an integer"),
        (lambda d: d["hosts"]["host-a"].update(port=70000), "hosts.host-a.port: must be 1-65535"),
        (lambda d: d["hosts"]["host-a"].update(key="/nonexistent/k"), "hosts.host-a.key: file not"),
        (lambda d: d["hosts"]["host-a"].update(workdir="rel"), "workdir: must be an absolute"),
        (lambda d: d.update(hosts={}), "hosts: at least one host"),
        (lambda d: d.pop("hosts"), "hosts: missing"),
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d["policy"].update(retries="many"), "policy.retries: must be an integer"),
        (lambda d: d["workloads"]["counter"].update(pid=5), "give exactly one of"),
        (lambda d: d["workloads"]["counter"].pop("pidfile"), "give exactly one of"),
        (lambda d: d["workloads"]["counter"].update(runtime="vm"), "unknown runtime 'vm'"),
        (lambda d: d["workloads"]["counter"].update(criu_options="-x"), "must be a list of"),
        (lambda d: d["workloads"]["counter"].update(criu_options=["-x; rm"]), "bad option"),
        (lambda d: d["workloads"].update({"a; rm -rf /": {"pid": 3}}), "workloads: bad name"),
        (lambda d: d["hosts"].update({"$(reboot)": {}}), "hosts: bad name"),
        (lambda d: d["workloads"]["counter"].update(match="(", pidfile=None), "match: bad regex"),
        (lambda d: d["workloads"]["counter"].update(criu_options=["--action-script=x"]), "set by"),
        (lambda d: d["workloads"]["counter"].update(criu_options=["--action-scr=x"]), "set by"),
        (lambda d: d["workloads"]["counter"].update(criu_options=["--images-dir", "/"]), "set by"),
        (lambda d: d["hosts"]["host-a"].update(address="-oProxyCommand=x"), "address: not a"),
        (lambda d: d["hosts"]["host-a"].update(user="root\nx"), "user: not a user"),
        (lambda d: d["hosts"]["host-a"].update(bridge="br0; x"), "bridge: bad interface"),
        (lambda d: d["workloads"]["counter"].update(network={"tcp": "maybe"}), "keep or close"),
        (lambda d: d["workloads"]["counter"].update(network={"veth": "a b"}), "bad interface"),
        (lambda d: d["workloads"]["counter"].update(network={"vet": "x"}), "network.vet: unknown"),
        (lambda d: d["policy"].update(goal=101), "policy.goal: must be between 0 and 100"),
        (lambda d: d["policy"].update(max_iterations=0), "policy.max_iterations: must be between"),
        (lambda d: d["policy"].update(max_downtime_ms=0), "policy.max_downtime_ms: must be at"),
        (lambda d: d["policy"].update(max_precopy_seconds=-1), "max_precopy_seconds: must be at"),
        (lambda d: d["policy"].update(max_downtime_ms=1.5), "max_downtime_ms: must be an integer"),
        (lambda d: d["workloads"]["counter"].update(sync_paths="/x"), "sync_paths: must be a list"),
        (lambda d: d["workloads"]["counter"].update(sync_paths=["rel"]), "must be an absolute"),
        (lambda d: d["workloads"]["counter"].update(sync_paths=["/a/../etc"]), "(no ..)"),
    ],
)
def test_each_error_names_key_and_file(tmp_path, keys, mutate, expect) -> None:
    data = good(keys)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load(path)
    msg = str(e.value)
    assert expect in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load(write(tmp_path, "hosts:\n  a: [\n"))
    with pytest.raises(ConfigError, match="top level: must be a mapping"):
        load(write(tmp_path, "- 1\n"))


def test_unknown_names(tmp_path: Path, keys: dict[str, str]) -> None:
    cfg = load(write(tmp_path, good(keys)))
    with pytest.raises(ConfigError, match="unknown host 'host-z'"):
        cfg.host("host-z")
    with pytest.raises(ConfigError, match="unknown workload 'nope'"):
        cfg.workload("nope")
    with pytest.raises(ConfigError, match="pid must be a number"):
        cfg.workload("pid:$(reboot)")
    with pytest.raises(ConfigError, match="not a usable path"):
        cfg.workload("pidfile:/a\nb")


def test_the_example_config_is_valid(tmp_path: Path, keys: dict[str, str]) -> None:
    data = yaml.safe_load((Path(__file__).parents[2] / "migrate.yaml.example").read_text())
    for host in data["hosts"].values():
        host.update(keys)  # the example's key paths do not exist here
    cfg = load(write(tmp_path, data))
    assert cfg.workload("counter").network.tcp == "keep"
    assert cfg.workload("web-podman").container == "web"


def test_hostile_and_odd_input_is_one_line(tmp_path: Path, keys: dict[str, str]) -> None:
    """Unicode digits in pid:, NaN/inf policy numbers, IPv6, code-loading CRIU options, and
    one machine under two names: each refused with one line naming what."""
    cfg = load(write(tmp_path, good(keys)))
    for spec in ("pid:١٢٣", "pid:1", "pid:-5", "pid:"):
        with pytest.raises(ConfigError, match="pid must be a number > 1"):
            cfg.workload(spec)
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match="--max-precopy-seconds: must be a finite number"):
            cfg.with_policy(max_precopy_seconds=float(value))
    with pytest.raises(ConfigError, match="retry_deadline: must be a finite number"):
        load(write(tmp_path, {**good(keys), "policy": {"retry_deadline": float("nan")}}))
    with pytest.raises(ConfigError, match="--bwlimit must be a positive"):
        cfg.with_policy(bwlimit=0)
    six = good(keys)
    six["hosts"]["host-b"]["address"] = "2001:db8::2"
    with pytest.raises(ConfigError, match="IPv6 addresses are not supported yet"):
        load(write(tmp_path, six))
    lib = good(keys)
    lib["workloads"]["counter"]["criu_options"] = ["--libdir=/tmp/evil"]
    with pytest.raises(ConfigError, match="--libdir is set by migrate itself"):
        load(write(tmp_path, lib))
    twice = good(keys)
    twice["hosts"]["host-c"] = {"address": "198.18.0.1", **keys}
    with pytest.raises(ConfigError, match="host-a and host-c are one machine"):
        load(write(tmp_path, twice)).route("host-a", "host-c")


def test_policy_prefault_is_a_bool(tmp_path: Path, keys: dict[str, str]) -> None:
    assert load(write(tmp_path, good(keys))).policy.prefault is False
    data = good(keys)
    data["policy"] = {"prefault": True}
    assert load(write(tmp_path, data)).policy.prefault is True
    data["policy"] = {"prefault": "no"}
    with pytest.raises(ConfigError, match="prefault"):
        load(write(tmp_path, data))
