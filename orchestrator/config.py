"""Load and validate migrate.yaml into dataclasses; every error is one line naming key and file."""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import MigrationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# A host name or an IP address; never starting with "-" (it would read as an ssh option).
ADDRESS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,252}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Options the tool sets itself, or that would run commands: never taken from a config.
RESERVED_CRIU_OPTIONS = (
    "--images-dir", "--work-dir", "--log-file", "--pidfile", "--tree", "--leave-running",
    "--leave-stopped", "--restore-detached", "--prev-images-dir", "--page-server", "--address",
    "--port", "--lazy-pages", "--action-script", "--exec-cmd", "--config", "--status-fd",
    "--libdir",  # loads plugins: code

)  # fmt: skip
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")  # IFNAMSIZ - 1
LOCATORS = ("pid", "pidfile", "systemd_unit", "match")
RUNTIMES = ("process", "lxc", "runc", "podman")
CONTAINER_RUNTIMES = RUNTIMES[1:]  # found by `container` (a name), not by a pid
# Container names as all three runtimes accept them; nothing an option or a path could hide in.
CONTAINER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Per-runtime paths (the same on both hosts); None: the runtime's own default.
RUNTIME_PATHS = {"lxc": ("lxcpath",), "runc": ("runc_root", "bundle"),
                 "podman": ("podman_root", "podman_runroot")}  # fmt: skip


class ConfigError(MigrationError):
    """Bad configuration or command-line input (exit code 2)."""


@dataclass(frozen=True)
class HostConfig:
    name: str
    address: str
    key: str
    known_hosts: str
    port: int = 22
    user: str = "root"
    workdir: str = "/var/lib/migrate"
    criu: str = "criu"
    bridge: str = "br0"  # where restored workloads' veths are plugged in on this host
    rsync_key: str | None = None
    rsync_known_hosts: str | None = None
    capacity_mb: int | None = None  # evacuate: the RSS this host may hold from placed workloads


@dataclass(frozen=True)
class NetworkConfig:
    """A workload that owns a network namespace: how its connections and veth travel."""

    tcp: str = "keep"  # keep: established connections survive; close: restored closed
    skip_in_flight: bool = False  # drop half-open (SYN) connections instead of failing the dump
    interface: str = "eth0"  # the workload's interface, whose host-side veth peer moves
    veth: str | None = None  # host-side name of that veth (default: found from the peer)


TCP_MODES = ("keep", "close")


@dataclass(frozen=True)
class WorkloadConfig:
    name: str
    runtime: str = "process"
    pid: int | None = None
    pidfile: str | None = None
    systemd_unit: str | None = None
    match: str | None = None
    criu_options: tuple[str, ...] = ()
    health: str | None = None
    network: NetworkConfig = field(default_factory=NetworkConfig)
    # Files not on shared storage, rsynced to the same paths on the destination: while the
    # workload runs (each pre-copy round) and a last pass while it is frozen.
    sync_paths: tuple[str, ...] = ()
    host: str | None = None  # where it runs (evacuate moves the workloads placed on a host)
    container: str | None = None  # lxc, runc, podman: the container's name
    lxcpath: str | None = None  # lxc: where containers live (default /var/lib/lxc)
    runc_root: str | None = None  # runc: its state root (default /run/runc)
    bundle: str | None = None  # runc: the bundle (default: as `runc state` reports it)
    podman_root: str | None = None  # podman --root (default: podman's storage.conf)
    podman_runroot: str | None = None  # podman --runroot

    @property
    def locator(self) -> tuple[str, str]:
        """The one way to find the root pid, as (kind, value)."""
        for kind in LOCATORS:
            value = getattr(self, kind)
            if value is not None:
                return kind, str(value)
        raise ConfigError(f"workload {self.name}: no way to find its pid")


@dataclass(frozen=True)
class Policy:
    connect_timeout: float = 10.0
    command_timeout: float = 300.0
    retries: int = 3
    retry_deadline: float = 60.0
    stall_timeout: float = 30.0  # a transfer with no progress this long is abandoned and retried
    bwlimit: int | None = None  # rsync's bandwidth limit, KiB/s (None: unlimited)
    compress: bool = False  # rsync compresses what it sends
    allow_postcopy: bool = False  # `auto` may pick post-copy (no rollback once resumed)
    postcopy_deadline: float = 600.0  # post-copy: seconds for the destination to pull all pages
    # Pre-copy's stop rule: freeze once the estimated freeze fits max_downtime_ms, or a round
    # wrote <= goal percent of the previous round's pages, or pages stop shrinking, or after
    # max_iterations rounds or max_precopy_seconds.
    max_downtime_ms: int = 500
    goal: int = 20
    max_iterations: int = 8
    max_precopy_seconds: float = 120.0
    # Run each host's commands through a small agent (python3, started over the connection;
    # nothing installed): no shell or ssh session per command. False: the old way, slower.
    agent: bool = True
    # A TCP connection of a plain tree to a peer outside it, on an address that does not move
    # with it: refuse (pre-flight names it) or close (restored closed, CRIU --tcp-close).
    tcp_outside: str = "refuse"
    # `criu cpuinfo check` of the source's CPU on the destination: strict refuses a mismatch.
    cpu_check: str = "strict"
    # The link's ssh ciphers, in order of preference (`ssh -c a,b`: the first both hosts offer
    # wins); measured fastest first (docs/bench/ciphers.md). Empty: ssh's own default.
    ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
    # Stream: before the freeze, the destination touches then frees as much memory as it will
    # take (the page server's page cache and the restored tree: 2 x its RSS, at most half of
    # its MemFree), so the restore faults in memory just backed, not memory a VM's hypervisor
    # has taken back (free page reporting: 2 s/GiB here, not 0.4). Costs that time before the
    # freeze; gained nothing where memory was already warm (docs/bench/stream.md). Opt-in.
    prefault: bool = False


CIPHER_RE = re.compile(r"^[a-z0-9][a-z0-9@._-]{0,63}$")  # as `ssh -Q cipher` lists them

# (key, lowest allowed, highest allowed) for the policy's numbers
POLICY_RANGES: tuple[tuple[str, float, float | None], ...] = (
    ("max_downtime_ms", 1, None),
    ("goal", 0, 100),
    ("max_iterations", 1, 100),
    ("max_precopy_seconds", 0.001, None),
)


# the policy's words: (key, allowed values)
POLICY_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tcp_outside", ("refuse", "close")),
    ("cpu_check", ("strict", "off")),
)


def check_policy(policy: Policy, where: str, flags: bool = False) -> None:
    """ConfigError naming the key (or with `flags`, the command-line option) when a policy
    number is out of range, or not a finite number at all (NaN, inf), or a word is unknown."""
    for key, allowed in POLICY_CHOICES:
        value = getattr(policy, key)
        if value not in allowed:
            name = "--" + key.replace("_", "-") if flags else where + key
            raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, not {value!r}")
    for f in fields(policy):
        value = getattr(policy, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            name = "--" + f.name.replace("_", "-") if flags else where + f.name
            raise ConfigError(f"{name}: must be a finite number, not {value}")
    for key, low, high in POLICY_RANGES:
        value = getattr(policy, key)
        if value < low or (high is not None and value > high):
            span = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            name = "--" + key.replace("_", "-") if flags else where + key
            raise ConfigError(f"{name}: must be {span}, not {value}")


@dataclass(frozen=True)
class Config:
    path: Path
    hosts: dict[str, HostConfig]
    workloads: dict[str, WorkloadConfig] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    state_dir: Path = Path("~/.local/state/migrate").expanduser()
    temporal: Any = None  # fleet mode: orchestrator.fleet.settings.TemporalSettings

    def with_policy(self, **overrides: Any) -> Config:
        """This config with command-line policy overrides (None: not given), checked and
        named as the options they came from."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("bwlimit") is not None and given["bwlimit"] < 1:
            raise ConfigError(
                f"--bwlimit must be a positive number of KiB/s, not {given['bwlimit']}"
            )
        policy = replace(self.policy, **given)
        check_policy(policy, "", flags=True)
        return replace(self, policy=policy)

    def route(self, source: str, destination: str) -> tuple[HostConfig, HostConfig]:
        """Two distinct hosts by name (the same machine under two names is refused too)."""
        src, dst = self.host(source), self.host(destination)
        if src.name == dst.name:
            raise ConfigError(f"source and destination are the same host ({src.name})")
        if (src.address, src.port) == (dst.address, dst.port):
            raise ConfigError(
                f"hosts {src.name} and {dst.name} are one machine ({src.address} port {src.port})"
            )
        return src, dst

    def host(self, name: str) -> HostConfig:
        if name not in self.hosts:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise ConfigError(f"unknown host {name!r} (hosts in {self.path}: {known})")
        return self.hosts[name]

    def workload(self, spec: str) -> WorkloadConfig:
        """A workload by name, or ad hoc as `pid:N` / `pidfile:PATH`."""
        kind, sep, value = spec.partition(":")
        if sep and kind == "pid":
            if not (value.isascii() and value.isdigit()) or int(value) < 2:
                raise ConfigError(f"workload {spec!r}: pid must be a number > 1")
            return WorkloadConfig(name=f"pid-{value}", pid=int(value))
        if sep and kind == "pidfile":
            _check_path(value, f"workload {spec!r}")
            return WorkloadConfig(name=f"pidfile-{Path(value).name}", pidfile=value)
        if spec not in self.workloads:
            known = ", ".join(sorted(self.workloads)) or "none"
            raise ConfigError(
                f"unknown workload {spec!r} (workloads in {self.path}: {known}; "
                "or give pid:N or pidfile:PATH)"
            )
        return self.workloads[spec]


def config_path(explicit: str | None) -> Path:
    """--config, else $MIGRATE_CONFIG, else ./migrate.yaml."""
    return Path(explicit or os.environ.get("MIGRATE_CONFIG") or "migrate.yaml")


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse(data, path)


def parse(data: Any, path: Path) -> Config:
    v = _Validator(path)
    top = v.mapping(data, "")
    v.only(top, "", ("hosts", "workloads", "policy", "state_dir", "temporal"))
    hosts_raw = v.mapping(top.get("hosts"), "hosts", required=True)
    if not hosts_raw:
        raise ConfigError(f"{path}: hosts: at least one host is required")
    hosts = {name: _host(v, name, raw) for name, raw in hosts_raw.items()}
    workloads_raw = v.mapping(top.get("workloads", {}) or {}, "workloads")
    workloads = {name: _workload(v, name, raw) for name, raw in workloads_raw.items()}
    policy = _dataclass(v, Policy, _ciphers(v, top.get("policy", {}) or {}), "policy")
    check_policy(policy, f"{path}: policy.")
    state_dir = Path(v.typed(top.get("state_dir", "~/.local/state/migrate"), "state_dir", str))
    for wl in workloads.values():
        if wl.host is not None and wl.host not in hosts:
            raise ConfigError(
                f"{path}: workloads.{wl.name}.host: unknown host {wl.host!r} "
                f"(hosts: {', '.join(sorted(hosts))})"
            )
    temporal = _temporal(top.get("temporal"), path)
    return Config(path, hosts, workloads, policy, state_dir.expanduser(), temporal)


def _ciphers(v: _Validator, raw: Any) -> Any:
    """policy with its `ciphers` list (cipher names, as `ssh -Q cipher` lists them) a tuple."""
    raw = dict(v.mapping(raw, "policy"))
    if "ciphers" in raw:
        names = raw["ciphers"]
        if not isinstance(names, list) or not all(
            isinstance(c, str) and CIPHER_RE.match(c) for c in names
        ):
            raise ConfigError(
                f"{v.path}: policy.ciphers: must be a list of ssh cipher names "
                "(e.g. aes128-gcm@openssh.com)"
            )
        raw["ciphers"] = tuple(names)
    return raw


def _temporal(raw: Any, path: Path) -> Any:
    """Fleet mode's section (orchestrator/fleet/settings.py: pure, no temporalio needed)."""
    from orchestrator.fleet import settings

    try:
        return settings.parse(raw, path)
    except settings.SettingsError as e:
        raise ConfigError(str(e)) from None


def _host(v: _Validator, name: Any, raw: Any) -> HostConfig:
    v.name(name, "hosts")
    host = _dataclass(v, HostConfig, raw, f"hosts.{name}", name=name)
    for key in ("key", "known_hosts"):
        p = Path(getattr(host, key)).expanduser()
        if not p.is_file():
            raise ConfigError(f"{v.path}: hosts.{name}.{key}: file not found: {p}")
    for key in ("workdir", "criu", "rsync_key", "rsync_known_hosts"):
        value = getattr(host, key)
        if value is not None:
            _check_path(value, f"{v.path}: hosts.{name}.{key}")
    if not ADDRESS_RE.match(host.address):
        raise ConfigError(f"{v.path}: hosts.{name}.address: not a host name or IP address")
    if ":" in host.address:
        raise ConfigError(
            f"{v.path}: hosts.{name}.address: IPv6 addresses are not supported yet (rsync and "
            "ssh between hosts would need them bracketed): use a host name or an IPv4 address"
        )
    if not USER_RE.match(host.user):
        raise ConfigError(f"{v.path}: hosts.{name}.user: not a user name")
    if not IFNAME_RE.match(host.bridge):
        raise ConfigError(f"{v.path}: hosts.{name}.bridge: bad interface name")
    if not 0 < host.port < 65536:
        raise ConfigError(f"{v.path}: hosts.{name}.port: must be 1-65535")
    if host.capacity_mb is not None and host.capacity_mb < 1:
        raise ConfigError(f"{v.path}: hosts.{name}.capacity_mb: must be a positive number of MiB")
    if not Path(host.workdir).is_absolute():
        raise ConfigError(f"{v.path}: hosts.{name}.workdir: must be an absolute path")
    return host


def _workload(v: _Validator, name: Any, raw: Any) -> WorkloadConfig:
    v.name(name, "workloads")
    raw = dict(v.mapping(raw, f"workloads.{name}"))
    opts = raw.get("criu_options", [])
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise ConfigError(f"{v.path}: workloads.{name}.criu_options: must be a list of strings")
    for o in opts:
        if not o.startswith("--") or "\n" in o or len(o) > 512:
            raise ConfigError(f"{v.path}: workloads.{name}.criu_options: bad option {o[:60]!r}")
        option = o.split("=", 1)[0]
        if any(r.startswith(option) for r in RESERVED_CRIU_OPTIONS):  # getopt takes prefixes
            raise ConfigError(
                f"{v.path}: workloads.{name}.criu_options: {option} is set by migrate itself "
                "(or runs commands) and cannot be given"
            )
    raw["criu_options"] = tuple(opts)
    sync = raw.get("sync_paths", [])
    if not isinstance(sync, list) or not all(isinstance(p, str) for p in sync):
        raise ConfigError(f"{v.path}: workloads.{name}.sync_paths: must be a list of paths")
    for p in sync:
        _check_path(p, f"{v.path}: workloads.{name}.sync_paths")
        if not p.startswith("/") or "/../" in p + "/" or p.rstrip("/") == "":
            raise ConfigError(
                f"{v.path}: workloads.{name}.sync_paths: {p[:60]!r} must be an absolute path "
                "below / (no ..)"
            )
    raw["sync_paths"] = tuple(sync)
    net = _dataclass(v, NetworkConfig, raw.pop("network", {}) or {}, f"workloads.{name}.network")
    if net.tcp not in TCP_MODES:
        raise ConfigError(f"{v.path}: workloads.{name}.network.tcp: must be keep or close")
    for key in ("interface", "veth"):
        value = getattr(net, key)
        if value is not None and not IFNAME_RE.match(value):
            raise ConfigError(f"{v.path}: workloads.{name}.network.{key}: bad interface name")
    wl = _dataclass(v, WorkloadConfig, raw, f"workloads.{name}", name=name, network=net)
    if wl.runtime in CONTAINER_RUNTIMES:
        _container(v, wl)
        return wl
    if wl.container is not None:
        raise ConfigError(
            f"{v.path}: workloads.{name}.container: only for runtime lxc, runc or podman"
        )
    given = [k for k in LOCATORS if getattr(wl, k) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"{v.path}: workloads.{name}: give exactly one of {', '.join(LOCATORS)}"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if wl.runtime not in RUNTIMES:
        raise ConfigError(
            f"{v.path}: workloads.{name}.runtime: unknown runtime {wl.runtime!r} "
            f"(known: {', '.join(RUNTIMES)})"
        )
    if wl.pid is not None and wl.pid < 2:
        raise ConfigError(f"{v.path}: workloads.{name}.pid: must be > 1")
    if wl.match is not None:
        try:
            re.compile(wl.match)
        except re.error as e:
            raise ConfigError(f"{v.path}: workloads.{name}.match: bad regex: {e}") from None
    return wl


def _container(v: _Validator, wl: WorkloadConfig) -> None:
    """A container workload: a safe name, no pid locator, only its runtime's absolute paths."""
    where = f"{v.path}: workloads.{wl.name}"
    if wl.container is None:
        raise ConfigError(f"{where}.container: required for runtime {wl.runtime}")
    if not CONTAINER_RE.match(wl.container):
        raise ConfigError(
            f"{where}.container: bad container name {wl.container[:60]!r} "
            "(letters, digits, '.', '_', '-'; at most 63; not starting with '-' or '.')"
        )
    given = [k for k in LOCATORS if getattr(wl, k) is not None]
    if given:
        raise ConfigError(f"{where}.{given[0]}: a {wl.runtime} workload is found by its container")
    for runtime, keys in RUNTIME_PATHS.items():
        for key in keys:
            value = getattr(wl, key)
            if value is None:
                continue
            if runtime != wl.runtime:
                raise ConfigError(f"{where}.{key}: only for runtime {runtime}")
            _check_path(value, f"{where}.{key}")
            if not value.startswith("/") or "/../" in f"{value}/":
                raise ConfigError(f"{where}.{key}: must be an absolute path without '..'")


def _check_path(value: str, where: str) -> None:
    if not value or "\n" in value or "\0" in value or len(value) > 4096:
        raise ConfigError(f"{where}: not a usable path: {value[:60]!r}")


class _Validator:
    def __init__(self, path: Path) -> None:
        self.path = path

    def mapping(self, value: Any, key: str, required: bool = False) -> dict[str, Any]:
        where = key or "top level"
        if value is None and required:
            raise ConfigError(f"{self.path}: {where}: missing (required)")
        if not isinstance(value, dict):
            raise ConfigError(f"{self.path}: {where}: must be a mapping")
        return value

    def only(self, raw: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for k in raw:
            if k not in allowed:
                prefix = f"{key}." if key else ""
                raise ConfigError(
                    f"{self.path}: {prefix}{k}: unknown key (expected one of {', '.join(allowed)})"
                )

    def name(self, name: Any, section: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(
                f"{self.path}: {section}: bad name {str(name)[:60]!r} "
                "(letters, digits, '.', '_', '-'; at most 63)"
            )

    def typed(self, value: Any, key: str, kind: type | tuple[type, ...]) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.path}: {key}: must be {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                f"{self.path}: {key}: must be {_kind_name(kind)}, got {type(value).__name__}"
            )
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"str": "a string", "int": "an integer", "float": "a number", "tuple": "a list"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "str | None": str,
    "int | None": int,
    "tuple[str, ...]": tuple,
}


def _dataclass(v: _Validator, cls: Any, raw: Any, key: str, **fixed: Any) -> Any:
    raw = v.mapping(raw, key)
    names = [f.name for f in fields(cls) if f.name not in fixed]
    v.only(raw, key, tuple(names))
    values = dict(fixed)
    for f in fields(cls):
        if f.name in fixed:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        if f.name not in raw:
            if required:
                raise ConfigError(f"{v.path}: {key}.{f.name}: missing (required)")
            continue
        value = raw[f.name]
        if value is None and "None" in str(f.type):
            values[f.name] = None
            continue
        values[f.name] = v.typed(value, f"{key}.{f.name}", _TYPES[str(f.type)])
    return cls(**values)
