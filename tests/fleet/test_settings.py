"""The `temporal:` config section (one-line errors), and the local mode without temporalio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, parse
from orchestrator.fleet.settings import TemporalSettings, TLSSettings


def _config(tmp_path: Path, temporal: object) -> object:
    key = tmp_path / "id"
    key.write_text("k")
    hosts = {"a": {"address": "198.18.0.1", "key": str(key), "known_hosts": str(key)}}
    return parse({"hosts": hosts, "temporal": temporal}, tmp_path / "migrate.yaml")


def test_valid_section(tmp_path: Path) -> None:
    c = _config(tmp_path, {"address": "127.0.0.1:7233", "namespace": "ops", "task_queue": "q",
                           "heartbeat_timeout": 5, "tls": {"ca": "/ca.pem"}})  # fmt: skip
    assert c.temporal == TemporalSettings(  # type: ignore[attr-defined]
        address="127.0.0.1:7233", namespace="ops", task_queue="q", heartbeat_timeout=5.0,
        tls=TLSSettings(ca="/ca.pem"),
    )  # fmt: skip
    assert _config(tmp_path, None).temporal == TemporalSettings()  # type: ignore[attr-defined]
    assert _config(tmp_path, {"tls": True}).temporal.tls == TLSSettings()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "section, says",
    [
        ({"address": "no-port"}, "temporal.address: 'no-port' is not HOST:PORT"),
        ({"address": "h:99999"}, "temporal.address"),
        ({"adress": "h:1"}, "temporal.adress: unknown key"),
        ({"heartbeat_timeout": 0}, "temporal.heartbeat_timeout: must be a number of seconds"),
        ({"max_attempts": "3"}, "temporal.max_attempts: must be an integer"),
        ({"tls": {"cert": "/c.pem"}}, "temporal.tls: cert and key go together"),
        ({"tls": {"ca": 3}}, "temporal.tls.ca: must be a non-empty string"),
        ("127.0.0.1:7233", "temporal: must be a mapping"),
    ],
)
def test_one_line_errors(tmp_path: Path, section: object, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, section)
    assert says in str(e.value) and "migrate.yaml" in str(e.value)
    assert "\n" not in str(e.value)


def test_local_mode_needs_no_temporalio(tmp_path: Path) -> None:
    """With temporalio unimportable the CLI parses and runs local commands; a fleet command
    says what to install (exit 2)."""
    code = (
        "import sys; sys.modules['temporalio'] = None\n"
        "from orchestrator.cli import main\n"
        "rc = main(['history', '--config', sys.argv[1]])\n"
        "assert rc == 0, rc\n"
        "assert 'temporalio' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(main(['evacuate', 'a', '--temporal', '--config', sys.argv[1]]))\n"
    )
    key = tmp_path / "id"
    key.write_text("k")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"hosts: {{a: {{address: 198.18.0.1, key: {key}, known_hosts: {key}}}}}\n"
                   f"state_dir: {tmp_path / 'state'}\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install -e '.[temporal]'" in r.stderr
