"""Transfer: the source pushes its images to the destination with rsync (retried: it resumes)."""

from __future__ import annotations

import os
import time

from orchestrator.criu import manifest
from orchestrator.phases.base import Phase, remove_dir
from orchestrator.plan import Context
from orchestrator.transport import rsync
from orchestrator.transport.ssh import quote, retrying


class Transfer(Phase):
    name = "transfer"

    def act(self, ctx: Context) -> None:
        ctx.bytes_transferred += push(ctx, ctx.src_dir, ctx.dst_dir, sums="check")  # #14
        ctx.bytes_transferred += sync_paths(ctx)
        mirror_paths(ctx)
        ctx.transferred_at = time.monotonic()


def push(ctx: Context, src_dir: str, dst_dir: str, sums: str = "") -> int:
    """rsync src_dir on the source into dst_dir on the destination; the bytes it sent.
    #14 sums, in the same command: "source" sums what it sends (the images made root-only
    first) into ctx.manifest (pre-copy rounds); "check" also has the destination sum its
    copies of everything in ctx.manifest and raises on any difference (nothing is restored)."""
    plan = ctx.plan
    argv = rsync.push_argv(
        plan.source, plan.destination, plan.policy, src_dir, dst_dir, plan.link_socket
    )
    what = f"rsync {ctx.src.name} -> {ctx.dst.name}"
    if not sums:
        return _rsync(ctx, argv, what)
    root = plan.src_images
    sub = "" if src_dir.rstrip("/") == root.rstrip("/") else os.path.relpath(src_dir, root)
    dst: list[str] = []
    if sums == "check":
        link = rsync.ssh_command(plan.source, plan.destination, plan.policy, plan.link_socket)
        dst = [*link, plan.destination.address, quote(manifest.dst_sum_argv(plan.dst_images))]
    argv = manifest.around_push(argv, src_dir, sub, plan.src_images, dst, ctx.manifest)
    out = _run(ctx, argv, what)
    if sums == "check":
        ctx.manifest = manifest.check(out, ctx.manifest, sub, ctx.src.name, ctx.dst.name,
                                      plan.dst_images)  # fmt: skip
    else:
        ctx.manifest = (ctx.manifest or manifest.Manifest()).merged(manifest.sent(out, sub))
    return rsync.bytes_sent(out)


def sync_paths(ctx: Context) -> int:
    """The workload's sync_paths (files not on shared storage) to the same paths on the
    destination; the bytes sent (0 when it has none)."""
    plan = ctx.plan
    if not plan.workload.sync_paths:
        return 0
    argv = rsync.paths_argv(plan.source, plan.destination, plan.policy,
                            plan.workload.sync_paths, plan.link_socket)  # fmt: skip
    return _rsync(ctx, argv, f"rsync of sync_paths {ctx.src.name} -> {ctx.dst.name}")


def mirror_paths(ctx: Context, warm: bool = False) -> None:
    """What travels with the images (a container's bundle, config, rootfs), made an exact copy
    at the same path on the destination. Prepare calls it too (warm), before the freeze, so
    that this second pass inside the freeze only sends what changed since; the warm copy
    notes which paths it made, for unmirror."""
    plan = ctx.plan
    paths = ctx.runtime.extra_paths(ctx.target) if ctx.target else []
    if warm and ctx.target is not None:
        missing = [p for p in paths if not ctx.dst.run(["test", "-e", p], mutates=False).ok]
        ctx.target.new_paths = missing
    for path in paths:
        argv = rsync.push_argv(plan.source, plan.destination, plan.policy, path, path,
                               plan.link_socket, mirror=True)  # fmt: skip
        what = f"rsync {path} {ctx.src.name} -> {ctx.dst.name}"
        ctx.bytes_transferred += _rsync(ctx, argv, what)


def unmirror(ctx: Context) -> None:
    """Undo the warm copy: remove what it made on the destination (never what was there)."""
    for path in ctx.target.new_paths if ctx.target else []:
        remove_dir(ctx.dst, path)


def _rsync(ctx: Context, argv: list[str], what: str) -> int:
    """Run one rsync on the source, retried while the link is what failed; the bytes sent."""
    return rsync.bytes_sent(_run(ctx, argv, what))


def _run(ctx: Context, argv: list[str], what: str) -> str:
    """Run one rsync on the source, retried while the link is what failed; its output."""
    # Only a broken or stalled link is worth another attempt (rsync resumes: --partial).
    t0 = time.monotonic()
    try:
        for attempt in retrying(ctx.plan.policy, what, (rsync.LinkError,), ctx.notes):
            with attempt:
                r = ctx.src.run(argv)
                if not r.ok:
                    raise rsync.failure(r.exit_code, r.stderr or r.stdout, what)
                return r.stdout
    finally:
        ctx.transfer_seconds += time.monotonic() - t0
    raise AssertionError("unreachable: retrying re-raises the last error")
