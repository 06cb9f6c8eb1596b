"""The remote steps that both a phase's undo and `recover` take, written once: wait for CRIU
to let go of an image dir, end a CRIU helper, abort a lazy dump, remove a restored copy, undo
a warm copy, wipe images. Each takes the Context; none decides anything (the runner and
recover.decide do)."""

from __future__ import annotations

import os
import time

from orchestrator.checkpoint import Pages
from orchestrator.criu import background, manifest
from orchestrator.criu.pagechannel import PageChannel
from orchestrator.errors import MigrationError
from orchestrator.layout import remove_dir
from orchestrator.plan import Context
from orchestrator.runtimes import net, procs
from orchestrator.transport import rsync
from orchestrator.transport.ssh import Host, quote

# After an abort, CRIU needs a moment to unlock the network and let the tasks run.
ABORT_WAIT = 30.0


def settle(host: Host, images_dir: str, timeout: float) -> None:
    """Before undoing: wait for a CRIU still working on images_dir (an interrupted or timed-out
    command goes on remotely), so that e.g. a late dump cannot stop a source just resumed."""
    if host.dry_run:
        return
    if not procs.wait_gone(host, images_dir, timeout):
        raise MigrationError(f"a process on {host} still uses {images_dir} after {timeout:.0f}s")


def kill_criu(host: Host, command: str, images_dir: str) -> None:
    """SIGKILL any `criu COMMAND` (and its detached wrapper) working on images_dir on host."""
    waiting = [
        p.pid
        for p in procs.table(host).values()
        if f" {command} " in p.args and images_dir in p.args
    ]
    procs.signal(host, "KILL", waiting)


def resume_source(ctx: Context) -> None:
    """Undo the final dump: the stopped source runs on (restored from its images if need be)."""
    settle(ctx.src, ctx.src_images.root, ctx.plan.policy.command_timeout)
    target = ctx.target
    if target is None:
        return
    stopped = ctx.runtime.state(ctx.src, target.root_pid) == procs.STOPPED
    if ctx.strategy.pages is Pages.PAGE_SERVER and target.net is not None and stopped:
        # The source's images lack the pages (they streamed into the destination): the
        # stopped copy is the only one with its memory. Never kill it to restore from those
        # images: unlock its network (sockets out of repair mode) and let it run on, as CRIU
        # itself does after a failed dump.
        unlock_network(ctx)
        procs.signal(ctx.src, "CONT", target.to_continue(procs.tree_of(ctx.src, target.root_pid)))
        return
    if stopped and locks_host_network(ctx):  # its sockets are in repair mode: out first
        unlock_network(ctx)
    ctx.runtime.resume(ctx.src, target, ctx.src_images.final)


def hold_source(ctx: Context) -> None:
    """Once the lazy dump is ready (its images written: the signal is in none of them), leave
    a SIGSTOP pending on every task of the source tree. CRIU resumes the tasks when a lazy
    dump fails (cr_dump_finish: TASK_ALIVE), even after the destination has resumed them
    there, e.g. when the lazy-pages daemon dies mid-transfer: the pending SIGSTOP stops them
    the moment CRIU lets go, so two copies never run. A rollback before the destination
    resumed SIGCONTs them (abort_lazy_dump)."""
    target = ctx.target
    if target is None or ctx.plan.dry_run:
        return
    agent = ctx.src.agent
    if agent is not None:  # in the agent's own process: nothing starts inside the freeze
        r = ctx.src.call(agent, "stop_tree", ctx.plan.policy.command_timeout, "stop the tree",
                         root=target.root_pid)  # fmt: skip
        if "error" in r or target.root_pid not in r.get("stopped", []):
            # Not held: stop here, before the destination resumes (the dump's undo lets the
            # source run on), rather than pass the point of no return unguarded.
            raise MigrationError(
                f"cannot hold the source tree on {ctx.src.name} stopped after its lazy dump: "
                f"{r.get('error') or 'its root was not stopped'}"
            )
    else:
        procs.signal(ctx.src, "STOP", procs.tree_of(ctx.src, target.root_pid))


def abort_lazy_dump(ctx: Context) -> None:
    """Before the destination resumed: make the lazy dump fail, which lets the source run on
    with its connections (never resume(): a lazy dump's images lack the pages)."""
    src = ctx.src
    if ctx.target is None:
        return
    if _lazy_dump_running(ctx):
        # A failed lazy dump resumes the tasks but not their network: unlock it first,
        # while they are still frozen. The destination holds the dump's connection on the
        # page channel: a truncated request through it makes the dump fail.
        unlock_network(ctx)
        deadline = time.monotonic() + ABORT_WAIT
        while time.monotonic() < deadline:
            ctx.dst.run(channel(ctx).abort_argv())
            if background.wait(src, ctx.src_images.final, background.DUMP, 1) is not None:
                break
    end_channel(ctx)
    settle(src, ctx.src_images.root, ctx.plan.policy.command_timeout)
    if ctx.runtime.state(src, ctx.target.root_pid) == procs.STOPPED:
        # The dump ended as if every page had been pulled (its client went away cleanly):
        # the tasks keep all their memory, stopped.
        unlock_network(ctx)
        procs.signal(src, "CONT", ctx.target.to_continue(procs.tree_of(src, ctx.target.root_pid)))


def channel(ctx: Context) -> PageChannel:
    """The page channel: the one the run opened, or as the plan makes it (recover)."""
    return ctx.page_channel or PageChannel.for_dirs(
        ctx.src_images.root, ctx.dst_images.root, lazy=ctx.strategy.lazy
    )


def end_channel(ctx: Context) -> None:
    """SIGKILL the page channel's helpers on the destination that still wait (holding,
    handing over, serving): found by the channel's socket paths in their arguments."""
    prefix = f"{ctx.dst_images.root}/pages"
    helpers = [p.pid for p in procs.table(ctx.dst).values()
               if prefix in p.args and "python3" in p.args]  # fmt: skip
    procs.signal(ctx.dst, "KILL", helpers)


def push_images(ctx: Context, src_dir: str, dst_dir: str, check: bool) -> int:
    """Push one image dir, checksummed in the same command (criu/manifest.py): the source sums
    what rsync sends (made root-only first) into ctx.manifest; with check (the final push) the
    destination sums its copies of everything in it too, through the link, and any difference
    raises (nothing is restored). The bytes rsync sent."""
    root = ctx.src_images.root
    sub = os.path.relpath(src_dir, root) if src_dir.rstrip("/") != root else ""
    dst: list[str] = []
    if check:
        ssh = rsync.ssh_command(ctx.link.spec)
        dst = [
            *ssh,
            ctx.plan.destination.address,
            quote(manifest.dst_sum_argv(ctx.dst_images.root)),
        ]
    before = ctx.manifest
    out = ctx.link.push(src_dir, dst_dir,
                        around=lambda argv: manifest.around_push(argv, src_dir, sub, root, dst,
                                                                 before))  # fmt: skip
    if check:
        ctx.manifest = manifest.check(out, before, sub, ctx.src.name, ctx.dst.name,
                                      ctx.dst_images.root)  # fmt: skip
    else:
        ctx.manifest = (before or manifest.Manifest()).merged(manifest.sent(out, sub))
    return rsync.bytes_sent(out)


def kept_images_note(ctx: Context) -> str:
    """What --keep-images leaves behind, and that it is the workload's memory."""
    return (
        f"images kept (--keep-images) at {ctx.src.name}:{ctx.src_images.root} and "
        f"{ctx.dst.name}:{ctx.dst_images.root}: they hold the workload's memory (secrets "
        "included; root-only files); remove them when done"
    )


def _lazy_dump_running(ctx: Context) -> bool:
    images = ctx.src_images.root
    return any(images in p.args and " dump " in p.args for p in procs.table(ctx.src).values())


def unlock_network(ctx: Context) -> None:
    """Take the workload's sockets out of TCP repair mode and drop CRIU's network lock: a
    workload with its own network, or a plain tree dumped with --tcp-established (its
    criu_options), whose lock rules are in the host's namespace."""
    if ctx.target is None or not (ctx.target.net is not None or locks_host_network(ctx)):
        return
    pids = procs.tree_of(ctx.src, ctx.target.root_pid)
    own = ctx.target.net is not None
    r = ctx.src.run(net.unlock_argv(ctx.target.root_pid, pids, own_netns=own))
    if not r.ok:
        raise MigrationError(
            f"cannot unlock the workload's network on {ctx.src.name}: {r.error_line()}"
        )


def locks_host_network(ctx: Context) -> bool:
    """A plain process tree (no network namespace of its own) whose dump locks its TCP
    connections in the host's namespace: pre-flight found some (workloadcheck), or
    --tcp-established is among its criu_options."""
    t = ctx.target
    return (t is not None and t.net is None and not t.own_netns and ctx.runtime.name == "process"
            and (bool(t.tcp_connections)
                 or "--tcp-established" in ctx.runtime.workload.criu_options))  # fmt: skip


def remove_source(ctx: Context) -> None:
    """Confirm: kill the stopped source; a plain tree's lock rules in the host's namespace go
    with it (its sockets die silently, in repair mode, before the rules are dropped)."""
    assert ctx.target is not None
    if locks_host_network(ctx):
        ctx.src.run(net.kill_then_unlock_argv(procs.tree_of(ctx.src, ctx.target.root_pid)))
    ctx.runtime.remove(ctx.src, ctx.target.root_pid)


def remove_restored(ctx: Context) -> None:
    """Undo a restore: end a lazy-pages daemon, then kill the destination copy if any."""
    kill_criu(ctx.dst, "lazy-pages", ctx.dst_images.root)
    settle(ctx.dst, ctx.dst_images.root, ctx.plan.policy.command_timeout)
    pid = ctx.restored_pid or ctx.runtime.find_restored(ctx.dst, ctx.dst_images.final)
    if pid:
        ctx.runtime.remove(ctx.dst, pid)
        ctx.restored_pid = 0


def mirror_paths(ctx: Context, warm: bool = False) -> None:
    """What travels with the images (a container's bundle, config, rootfs), made an exact copy
    at the same path on the destination. Prepare calls it too (warm), before the freeze, so
    that the pass inside the freeze only sends what changed since; the warm copy notes which
    paths it made, for unmirror."""
    paths = ctx.runtime.extra_paths(ctx.target) if ctx.target else []
    if warm and ctx.target is not None:
        missing = [p for p in paths if not ctx.dst.run(["test", "-e", p], mutates=False).ok]
        ctx.target.new_paths = missing
    for path in paths:
        ctx.link.push(path, path, mirror=True)


def unmirror(ctx: Context) -> None:
    """Undo the warm copy: remove what it made on the destination (never what was there)."""
    for path in ctx.target.new_paths if ctx.target else []:
        remove_dir(ctx.dst, path)


def wipe_images_if_safe(ctx: Context, dirs: list[tuple[Host, str]]) -> None:
    """Undo's cleanup: remove dirs, unless the source copy does not run and its complete
    images are there (a failed resume left them the only copy: they stay, for `recover`, and
    the report says where)."""
    if ctx.plan.keep_images:
        ctx.notes.append(kept_images_note(ctx))
        return
    if ctx.target is not None and not ctx.plan.dry_run:
        src, final = ctx.src, ctx.src_images.final
        if not ctx.runtime.running(src, ctx.target.root_pid) and ctx.runtime.checkpointed(
            src, final
        ):
            kept = ", ".join(f"{h.name}:{d}" for h, d in dirs)
            ctx.notes.append(f"images kept (the source copy does not run): {kept}")
            return
    for host, path in dirs:
        remove_dir(host, path)


def wipe_images(ctx: Context) -> None:
    """Close the source's link; remove the image dirs on both hosts unless kept."""
    ctx.link.close()
    if ctx.plan.keep_images:
        ctx.notes.append(kept_images_note(ctx))
        return
    remove_dir(ctx.src, ctx.src_images.root)
    remove_dir(ctx.dst, ctx.dst_images.root)
