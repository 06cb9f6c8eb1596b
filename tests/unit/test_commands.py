"""Command building: CRIU and rsync argv, and the one quoting function."""

from __future__ import annotations

import shlex

from orchestrator.config import HostConfig, Policy
from orchestrator.criu import commands as criu
from orchestrator.criu.logs import cause, error_lines
from orchestrator.transport import rsync
from orchestrator.transport.ssh import quote


def test_dump_and_restore_argv() -> None:
    d = criu.dump("/opt/criu", criu.DumpOptions(pid=42, images_dir="/w/i", ext_mount_map_auto=True))
    assert d[:7] == ["/opt/criu", "dump", "-t", "42", "-D", "/w/i", "-o"]
    assert "--leave-stopped" in d and d[-2:] == ["--ext-mount-map", "auto"]
    r = criu.restore("criu", criu.RestoreOptions("/w/i", "/w/i/p", root="/", extra=["--x"]))
    assert r[:4] == ["criu", "restore", "-d", "-D"]
    assert r[r.index("--pidfile") + 1] == "/w/i/p" and r[r.index("--root") + 1] == "/"
    assert r[-1] == "--x"


def test_parse_version() -> None:
    assert criu.parse_version("Version: 4.2.1\nGitID: v4.2.1") == (4, 2, 1)
    assert criu.parse_version("Version: 3.17\n") == (3, 17, 0)
    assert criu.parse_version("bash: criu: not found") is None


def test_quote_passes_hostile_strings_as_data() -> None:
    for hostile in ["a; rm -rf /", "$(reboot)", "`id`", "../../etc", "a\nb", "x" * 5000, "'\""]:
        line = quote(["echo", hostile])
        assert shlex.split(line) == ["echo", hostile]


def test_rsync_push_is_strict_and_quoted() -> None:
    src = HostConfig("a", "198.18.0.1", "/k a", "/kh", rsync_key="/rk", rsync_known_hosts="/rkh")
    dst = HostConfig("b", "198.18.0.2", "/k", "/kh", port=2222, user="root")
    argv = rsync.push_argv(rsync.LinkSpec(src, dst, Policy()), "/w/img/1", "/v/img/1")
    assert argv[-2:] == ["/w/img/1/", "198.18.0.2:/v/img/1/"]
    ssh = shlex.split(argv[argv.index("-e") + 1])
    assert ssh[ssh.index("-i") + 1] == "/rk"
    assert "StrictHostKeyChecking=yes" in ssh and "UserKnownHostsFile=/rkh" in ssh
    assert ssh[ssh.index("-p") + 1] == "2222"
    assert "--partial" in argv and "--compress" not in argv
    assert not any(a.startswith("--bwlimit") for a in argv)
    limited = rsync.push_argv(
        rsync.LinkSpec(src, dst, Policy(bwlimit=512, compress=True)), "/a", "/b"
    )
    assert "--bwlimit=512" in limited and "--compress" in limited


def test_rsync_bytes_sent() -> None:
    assert rsync.bytes_sent("Total bytes sent: 1,234,567\nTotal bytes received: 35") == 1234567
    assert rsync.bytes_sent("nothing") == 0


def test_criu_error_lines_skip_noise() -> None:
    log = """(00.000012) rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.001000) Warn  (criu/kerndat.c:1): something
(00.002000) Error (criu/cr-restore.c:1234): Can't fork for 848: File exists
(00.003000) Error (criu/cr-restore.c:2000): Restoring FAILED.
"""
    assert error_lines(log) == [
        "Error (criu/cr-restore.c:1234): Can't fork for 848: File exists",
        "Error (criu/cr-restore.c:2000): Restoring FAILED.",
    ]


def test_rsync_failure_names_the_first_cause_and_what_to_retry() -> None:
    full = (
        'rsync: [receiver] write failed on "/w/x": No space left on device (28)\n'
        "rsync error: error in file IO (code 11) at receiver.c(381)\n"
        "rsync: [sender] write error: Broken pipe (32)\n"
    )
    err = rsync.failure(12, full, "rsync a -> b")
    assert type(err) is rsync.RsyncError and "No space left on device" in str(err)
    stalled = rsync.failure(30, "rsync error: timeout in data send/receive (code 30)\n", "r")
    assert isinstance(stalled, rsync.LinkError)
    assert type(rsync.failure(23, "rsync: some files vanished\n", "r")) is rsync.RsyncError


def test_network_options() -> None:
    opts = criu.DumpOptions(
        pid=7, images_dir="/i", tcp_established=True, network_lock="nftables", skip_in_flight=True
    )
    d = criu.dump("criu", opts)
    assert "--tcp-established" in d and d[d.index("--network-lock") + 1] == "nftables"
    assert "--skip-in-flight" in d
    ropts = criu.RestoreOptions(
        "/i", "/i/p", tcp_established=True, tcp_close=True, veths=[("eth0", "vctr0", "br0")]
    )
    r = criu.restore("criu", ropts)
    assert r[r.index("--external") + 1] == "veth[eth0]:vctr0@br0"
    assert "--tcp-established" in r and "--tcp-close" in r and "--network-lock" not in r


def test_the_cause_is_the_first_error_not_the_summary() -> None:
    log = """(00.001) Error (criu/files-reg.c:1): Can't open file x on restore: No such file
(00.002) Error (criu/cr-restore.c:2): Can't fork for 848: File exists
(00.003) Error (criu/cr-restore.c:3): Restoring FAILED.
"""
    lines = error_lines(log, None)
    assert cause(lines) == "Error (criu/files-reg.c:1): Can't open file x on restore: No such file"
    assert cause(["Error (criu/cr-restore.c:3): Restoring FAILED."]) == (
        "Error (criu/cr-restore.c:3): Restoring FAILED."
    )
    assert cause([]) is None
