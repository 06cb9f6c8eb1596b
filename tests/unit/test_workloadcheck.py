"""The workload check's parsers and verdicts, on /proc outputs recorded on this kernel (6.18)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from orchestrator import workloadcheck as wc
from orchestrator.procparse import parse_addresses, parse_locks, parse_mountinfo, parse_tcp
from orchestrator.runtimes.process import lock_rules

FIXTURES = Path(__file__).parent / "fixtures" / "workloadcheck"
PLAIN = (FIXTURES / "plain-locks-tcp.txt").read_text()
PIDNS = (FIXTURES / "pidns-nsfs-stdio.txt").read_text()

PROC_LOCKS = """\
1: POSIX  ADVISORY  WRITE 19920 fe:00:2147236 0 EOF
1: -> POSIX  ADVISORY  WRITE 20001 fe:00:2147236 0 EOF
2: OFDLCK ADVISORY  WRITE -1 fe:00:2148327 0 EOF
3: FLOCK  ADVISORY  WRITE 24584 fe:00:2147315 0 EOF
4: LEASE  ACTIVE    READ 700 00:1a:12 0 EOF
"""


def test_parse_locks_skips_waiters() -> None:
    locks = parse_locks(PROC_LOCKS)
    assert [(lk.kind, lk.pid, lk.inode) for lk in locks] == [
        ("POSIX", 19920, 2147236), ("OFDLCK", -1, 2148327), ("FLOCK", 24584, 2147315),
        ("LEASE", 700, 12),
    ]  # fmt: skip
    assert locks[0].device == "fe:00" and locks[0].access == "WRITE"


def test_parse_tcp_v4_and_v6() -> None:
    v4 = "   2: 0100007F:AE66 0100007F:1B5A 01 00000000:00000000 00:0 0 0 0 7096204 2 x"
    v6 = (
        "   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF0000020012C6:D431 "
        "01 00000000:00000000 00:0 0 0 0 42 1 x"
    )
    (a,) = parse_tcp(v4)
    assert (a.local, a.remote, a.state) == ("127.0.0.1:44646", "127.0.0.1:7002", 1)
    assert a.inode == 7096204
    (b,) = parse_tcp(v6)
    assert (b.local, b.remote) == ("[::1]:8080", "198.18.0.2:54321") and b.connected
    assert parse_tcp("  sl  local_address rem_address   st tx_queue") == []


def test_parse_mountinfo_unescapes() -> None:
    text = (
        "508 507 0:4 net:[4026533070] /run/netns/rec-x rw - nsfs nsfs rw\n"
        r"36 25 0:32 / /mnt/with\040space rw shared:1 - tmpfs tmp rw"
        "\n"
    )
    ms = parse_mountinfo(text)
    assert [(m.mount_id, m.mount_point, m.fstype) for m in ms] == [
        (508, "/run/netns/rec-x", "nsfs"), (36, "/mnt/with space", "tmpfs"),
    ]  # fmt: skip


def test_plain_tree_locks_and_connections() -> None:
    facts = wc.parse_facts(PLAIN)
    assert [t.pid for t in facts.tasks] == [19920, 20070]
    assert not facts.own_mntns and not facts.own_netns
    assert not facts.cap_eff & (1 << wc.CAP_SYS_RESOURCE)  # root here lacks it
    v = wc.judge(facts)
    assert v.locked_files == ["/tmp/lk/posix.lock", "/tmp/lk/ofd.lock"]
    # One connection to a listener outside the tree; one pair within it (both ends inside).
    assert v.outside == ["127.0.0.1:52020 -> 127.0.0.1:7001"]
    assert sorted(v.connections) == sorted(
        ["127.0.0.1:44646 -> 127.0.0.1:7002", "127.0.0.1:7002 -> 127.0.0.1:44646",
         "127.0.0.1:52020 -> 127.0.0.1:7001"]
    )  # fmt: skip
    assert len(v.refusals) == 1
    assert "127.0.0.1:52020 -> 127.0.0.1:7001" in v.refusals[0]
    assert "tcp_outside: close" in v.refusals[0]
    closing = wc.judge(facts, tcp_outside="close")
    assert closing.refusals == [] and closing.outside == v.outside


def test_other_user_without_cap_sys_resource() -> None:
    facts = wc.parse_facts(PLAIN)
    other = replace(facts.tasks[1], uids=(65534,) * 4, gids=(65534,) * 4)
    lacking = replace(facts, tasks=(facts.tasks[0], other), tcp=())
    (why,) = wc.judge(lacking).refusals
    assert "pid 20070" in why and "uid 65534" in why and "CAP_SYS_RESOURCE" in why
    having = replace(lacking, cap_eff=lacking.cap_eff | 1 << wc.CAP_SYS_RESOURCE)
    assert wc.judge(having).refusals == []


def test_a_task_that_ended_while_read_is_no_other_user() -> None:
    """A short-lived child (a shell's `sleep`) gone between the pid list and its status: no
    ids read, and no refusal for it (seen flaky in the lab before)."""
    facts = wc.parse_facts(PLAIN)
    gone = replace(facts.tasks[1], uids=(), gids=())
    assert wc.judge(replace(facts, tasks=(facts.tasks[0], gone), tcp=())).refusals == []


def test_own_mounts_with_nsfs_mounts_and_stdio_from_outside() -> None:
    facts = wc.parse_facts(PIDNS)
    assert facts.own_mntns and not facts.own_netns
    refusals = wc.judge(facts).refusals
    assert any("/run/netns/rec-x" in r and "umount -l /run/netns" in r for r in refusals)
    outside = [r for r in refusals if "opened outside its own mount namespace" in r]
    assert any("fd 0 (/dev/null)" in r and "its stdio" in r for r in outside)
    assert any("fd 1 (/tmp/lk/outside.log)" in r for r in outside)
    # The same tree in the host's own mount namespace: CRIU dumps no mounts, no question.
    same = replace(facts, own_mntns=False)
    assert not any("opened outside" in r for r in wc.judge(same).refusals)


def test_user_namespace_with_veth() -> None:
    facts = wc.parse_facts(PLAIN)
    inner = tuple(replace(t, userns="user:[1]") for t in facts.tasks)
    nested = replace(facts, tasks=inner, veths=("veth-x",), own_netns=True)
    assert any("veth-x" in r and "user namespace" in r for r in wc.judge(nested).refusals)
    assert wc.judge(replace(nested, veths=())).refusals == []


def test_veth_names_parsed() -> None:
    text = PLAIN.replace(
        "[veth]\n", "[veth]\n7: eth0@if8: <BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue\n"
    )
    assert wc.parse_facts(text).veths == ("eth0",)


IPTABLES_S = """\
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 7301 --dport 58908 -j DROP
-A OUTPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 58908 --dport 7301 -j DROP
-A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 7301 --dport 40000 -j DROP
-A INPUT -s 127.0.0.1/32 -p tcp -m tcp --sport 7301 --dport 58908 -j DROP
"""  # noqa: E501  (recorded after a dump of a tree connected to 127.0.0.1:7301, CRIU 4.2.1)


def test_lock_rules_are_only_those_of_our_connections() -> None:
    rules = lock_rules(IPTABLES_S, ["127.0.0.1:58908 -> 127.0.0.1:7301"])
    assert [r[0] for r in rules] == ["INPUT", "OUTPUT"]
    assert rules[0][-6:] == ["--sport", "7301", "--dport", "58908", "-j", "DROP"]
    assert lock_rules(IPTABLES_S, []) == []
    v6 = (
        "-A OUTPUT -s ::1/128 -d ::1/128 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 5 "
        "--dport 6 -j DROP"
    )
    assert len(lock_rules(v6, ["[::1]:5 -> [::1]:6"])) == 1


IP_ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: br0    inet 198.18.0.2/24 brd 198.18.0.255 scope global br0\\       valid_lft forever
2: br0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever
"""


def test_listener_on_an_address_the_destination_lacks() -> None:
    assert parse_addresses(IP_ADDR) == {"127.0.0.1", "198.18.0.2", "fe80::1"}
    facts = wc.parse_facts(PLAIN)
    # the tree's listener (inode 7096203) bound to host-a's address instead of loopback
    tcp = tuple(replace(s, local="198.18.0.1:7002") if s.inode == 7096203 else s for s in facts.tcp)
    bound = replace(facts, tcp=tcp)
    why = [r for r in wc.judge(bound, "close", parse_addresses(IP_ADDR)).refusals]
    assert len(why) == 1 and "listens on 198.18.0.1:7002" in why[0]
    there = parse_addresses(IP_ADDR) | {"198.18.0.1"}
    assert wc.judge(bound, "close", there).refusals == []
    assert wc.judge(bound, "close", None).refusals == []  # not asked: not judged
    assert wc.judge(facts, "close", parse_addresses(IP_ADDR)).refusals == []  # on loopback


def test_a_pair_within_the_tree_on_the_hosts_address_cannot_follow() -> None:
    facts = wc.parse_facts(PLAIN)
    moved = {"127.0.0.1:44646": "198.18.0.1:44646", "127.0.0.1:7002": "198.18.0.1:7002"}
    tcp = tuple(
        replace(s, local=moved.get(s.local, s.local), remote=moved.get(s.remote, s.remote))
        for s in facts.tcp
    )
    v = wc.judge(replace(facts, tcp=tcp))
    assert "198.18.0.1:44646 -> 198.18.0.1:7002" in v.outside
    assert any("198.18.0.1:7002 -> 198.18.0.1:44646 cannot follow" in r for r in v.refusals)


def test_a_session_leader_outside_its_pid_namespace_is_refused() -> None:
    """Recorded on the lab: `sh -c 'sleep 600 & wait' &` from a shell outside host-a's pid
    namespace (session id 0 as the tree sees it: CRIU fails at dump), and `unshare --pid
    --fork setsid sleep` (its own session: NSsid's innermost field, 1, is what CRIU sees)."""
    outside = wc.parse_facts((FIXTURES / "session-outside.txt").read_text())
    assert [t.sid for t in outside.tasks] == [0, 0]
    (why,) = wc.judge(outside).refusals
    assert why.startswith(f"pid {outside.tasks[0].pid}'s session leader is outside")
    assert "setsid" in why
    own = wc.parse_facts((FIXTURES / "own-session-pidns.txt").read_text())
    assert [t.sid for t in own.tasks] == [1]
    assert not any("session leader" in r for r in wc.judge(own).refusals)
    # Outputs read before NSsid was asked for: no session id, no refusal.
    assert {t.sid for t in wc.parse_facts(PLAIN).tasks} == {None}
