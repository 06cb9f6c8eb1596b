"""Transfer: the final dump's images to the destination, inside the freeze: through the image
pipe (one request to each host's agent, phases/imagepipe.py) when it is open, else by rsync
over the source's link (retried while the link is what failed); both checksummed. Then the
sync_paths and what travels with a container."""

from __future__ import annotations

import os
import time

from orchestrator import actions, freeze
from orchestrator.criu import manifest
from orchestrator.errors import MigrationError
from orchestrator.phases.base import Phase
from orchestrator.plan import Context


class Transfer(Phase):
    name = "transfer"

    def act(self, ctx: Context) -> None:
        t0 = time.monotonic()
        piped = 0.0
        with ctx.src.recording() as ran:
            if ctx.image_pipe is not None:
                ctx.clock.transfer_bytes, piped = _through_pipe(ctx)
            else:
                sent = actions.push_images(ctx, ctx.src_images.final, ctx.dst_images.final,
                                           check=True)  # fmt: skip
                ctx.clock.transfer_bytes = sent
            ctx.link.push_paths(ctx.plan.workload.sync_paths)
            actions.mirror_paths(ctx)
        # the transfer's own time, as the source's host measured it: the pipe's send (the
        # source's agent), and the commands (rsync) it ran
        began, ended = freeze.span(ran)
        commands = (ended - began) if began is not None and ended is not None else 0.0
        if not piped and not ran:
            commands = time.monotonic() - t0
        ctx.clock.transfer_ms = round((piped + commands) * 1000, 1)
        ctx.clock.transferred_at = time.monotonic()


def _through_pipe(ctx: Context) -> tuple[int, float]:
    """Send the final dump through the image pipe; refuse it (no restore) if what is on the
    destination's disk differs from what the source read. The bytes sent, and the seconds the
    source's agent took to send them (its own clock)."""
    assert ctx.image_pipe is not None
    src_sock, dst_sock = ctx.image_pipe.split(":")
    src_agent, dst_agent = ctx.src.agent, ctx.dst.agent
    if src_agent is None or dst_agent is None:
        raise MigrationError("the image pipe's agents are gone (a connection broke)")
    timeout = ctx.plan.policy.command_timeout
    what = f"sending the images {ctx.src.name} -> {ctx.dst.name}"
    sent = ctx.src.call(src_agent, "send", timeout, what, sock=src_sock,
                        dir=ctx.src_images.final, bwlimit=ctx.plan.policy.bwlimit or 0,
                        stall=ctx.plan.policy.stall_timeout)  # fmt: skip
    if "error" in sent:  # e.g. the link broke: rsync retries, and resumes
        ctx.dst.call(dst_agent, "cancel", timeout, f"cancel {dst_sock}", sock=dst_sock)
        ctx.notes.append(f"the image pipe failed ({sent['error']}): the images went by rsync")
        ctx.image_pipe = None
        sent_by_rsync = actions.push_images(ctx, ctx.src_images.final, ctx.dst_images.final,
                                            check=True)  # fmt: skip
        return sent_by_rsync, 0.0
    got = ctx.dst.call(dst_agent, "collect", timeout, what, sock=dst_sock, timeout=timeout)
    if "error" in got:
        raise MigrationError(f"receiving the images on {ctx.dst.name} failed: {got['error']}")
    root = ctx.src_images.root
    final = ctx.src_images.final
    sub = os.path.relpath(final, root) if final.rstrip("/") != root else ""
    want = manifest.of_files(sent["files"], sub)
    if not want:
        raise MigrationError(f"the dump on {ctx.src.name} left no image to send")
    manifest.refuse_differences(want, manifest.of_files(got["files"], sub), ctx.src.name,
                                ctx.dst.name, ctx.dst_images.root)  # fmt: skip
    ctx.manifest = (ctx.manifest or manifest.Manifest()).merged(want)
    ctx.pipe_bytes += int(sent["bytes"])
    return int(sent["bytes"]), float(sent.get("seconds") or 0.0)
