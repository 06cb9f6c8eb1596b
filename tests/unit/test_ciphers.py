"""The link's ssh ciphers: from the policy (config file) to `ssh -c` on every link command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, HostConfig, Policy, load
from orchestrator.transport import rsync

SRC = HostConfig("a", "198.18.0.1", "/k", "/kh")
DST = HostConfig("b", "198.18.0.2", "/k", "/kh")


def spec(policy: Policy) -> rsync.LinkSpec:
    return rsync.LinkSpec(SRC, DST, policy, socket="/w/ssh-1")


def cipher_arg(ssh: list[str]) -> str | None:
    return ssh[ssh.index("-c") + 1] if "-c" in ssh else None


def test_default_policy_prefers_aes_gcm_then_chacha_on_every_link_command() -> None:
    s = spec(Policy())
    pushed = rsync.push_argv(s, "/w/i", "/v/i")
    argvs = [
        shlex.split(pushed[pushed.index("-e") + 1]),
        rsync.probe_argv(s),
        rsync.open_argv(s, "/w/log")[5:],  # sh -c SCRIPT sh LOG, then the master's ssh
        rsync.forward_argv(s, "/l:/r"),
        rsync.close_argv(s),
    ]
    for ssh in argvs:
        assert ssh[0] == "ssh"
        assert cipher_arg(ssh) == "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
        assert ssh.count("-c") == 1


def test_cipher_order_is_the_policys_and_empty_means_sshs_default() -> None:
    ssh = rsync.ssh_command(spec(Policy(ciphers=("chacha20-poly1305@openssh.com", "aes128-ctr"))))
    assert cipher_arg(ssh) == "chacha20-poly1305@openssh.com,aes128-ctr"
    assert cipher_arg(rsync.ssh_command(spec(Policy(ciphers=())))) is None


def write(tmp_path: Path, policy: dict) -> Path:
    key = tmp_path / "id"
    key.write_text("k")
    p = tmp_path / "migrate.yaml"
    hosts = {"h": {"address": "198.18.0.1", "key": str(key), "known_hosts": str(key)}}
    p.write_text(yaml.safe_dump({"hosts": hosts, "policy": policy}))
    return p


def test_config_ciphers_list(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, {"ciphers": ["aes256-gcm@openssh.com"]}))
    assert cfg.policy.ciphers == ("aes256-gcm@openssh.com",)
    assert load(write(tmp_path, {"ciphers": []})).policy.ciphers == ()
    assert load(write(tmp_path, {})).policy.ciphers == Policy().ciphers


@pytest.mark.parametrize("bad", ["aes128-ctr", ["-oProxyCommand=x"], ["a b"], [1], ["A,b"]])
def test_config_bad_ciphers_name_the_key(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match=r"policy\.ciphers: must be a list of ssh cipher names"):
        load(write(tmp_path, {"ciphers": bad}))
