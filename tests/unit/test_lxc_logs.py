"""The report names the cause of a failed LXC checkpoint/restore as LXC lays it out: CRIU's log
(when CRIU ran: LXC passes no -v, so echoes of the network come first) or only lxc-checkpoint's
stderr (when LXC refused before running CRIU)."""

from __future__ import annotations

from orchestrator.criu.logs import cause, error_lines

# restore.log of a stock container's restore (host /lib a symlink), as LXC 5 runs CRIU.
RESTORE_LOG = """Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
Warn  (criu/cr-restore.c:1050): Set CLONE_PARENT | CLONE_NEWPID but it might cause restore problem
Error: ipv4: Address already assigned.
Error: ipv6: address already assigned.
RTNETLINK answers: File exists
     1: Error (criu/mount-v2.c:324): mnt-v2: Failed to move_mount from /lib to /tmp/.criu.mntns.Y/mnt-440: Invalid argument
Error (criu/cr-restore.c:1265): 425294 exited, status=1
Error (criu/cr-restore.c:2331): Restoring FAILED.
Error (criu/cgroup.c:2055): cg: cgroupd: recv req error: No such file or directory
"""  # noqa: E501

# lxc-checkpoint -r's stderr when LXC refuses before CRIU runs (no restore.log).
LXC_STDERR = """lxc-checkpoint: stock: ../src/lxc/af_unix.c: lxc_abstract_unix_recv_fds_iov: 218 Connection reset by peer - Failed to receive response
lxc-checkpoint: stock: ../src/lxc/commands.c: lxc_cmd_rsp_recv_fds: 128 Failed to receive file descriptors for command "get_init_pid"
lxc-checkpoint: stock: ../src/lxc/criu.c: exec_criu: 1031 Invalid argument - lxc.console.path configured on source host but not target
lxc-checkpoint: stock: ../src/lxc/criu.c: do_restore: 1115 Failed to execute criu
lxc-checkpoint: stock: ../src/lxc/criu.c: __criu_restore: 1403 restore process died
lxc-checkpoint: stock: ../src/lxc/tools/lxc_checkpoint.c: restore_finalize: 203 Restoring stock failed
"""  # noqa: E501


def test_lxc_restore_log_names_criu_cause_not_the_network_echoes() -> None:
    lines = error_lines(RESTORE_LOG, None)
    assert cause(lines) == (
        "1: Error (criu/mount-v2.c:324): mnt-v2: Failed to move_mount from /lib to "
        "/tmp/.criu.mntns.Y/mnt-440: Invalid argument"
    )
    assert not any("address already assigned" in ln.lower() for ln in lines)


def test_lxc_stderr_names_lxc_refusal() -> None:
    lines = error_lines(LXC_STDERR, None)
    assert cause(lines) == (
        "criu.c: exec_criu: 1031 Invalid argument - lxc.console.path configured on source "
        "host but not target"
    )
    assert lines[-1] == "tools/lxc_checkpoint.c: restore_finalize: 203 Restoring stock failed"
