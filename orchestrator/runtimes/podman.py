"""Runtime `podman`: a Podman container, moved with `podman container checkpoint --export` /
`podman container restore --import`.

The export (one tar in the image directory, so the transfer phase carries it) holds CRIU's
images and the container's rootfs changes; the base image must already be on the
destination (pre-flight checks it: nothing can be pulled here). The checkpoint stops the
source container (Podman cannot checkpoint a paused one); its export IS the source copy from
then on: a rollback removes it and restores it on the source from that export, and confirm
removes it.

Podman is driven with `--cgroup-manager cgroupfs --events-backend file` (no systemd or
journald is assumed) and, when configured, private `--root` / `--runroot`.
"""

from __future__ import annotations

from orchestrator.criu import commands as criu
from orchestrator.criu.pagechannel import PageChannel
from orchestrator.errors import MigrationError
from orchestrator.runtimes import procs
from orchestrator.runtimes.base import Target
from orchestrator.runtimes.container import ContainerRuntime, criu_failed, detached
from orchestrator.transport.ssh import Host

EXPORT = "checkpoint.tar"
ERR = "podman.err"
# As LXC does by default: established TCP connections and file locks travel (no-ops without).
KEEP = ("--tcp-established", "--file-locks")
_STATES = {"running": procs.RUNNING, "paused": procs.STOPPED}
_FORMAT = "{{.State.Status}} {{.State.Pid}} {{.ImageName}}"


class PodmanRuntime(ContainerRuntime):
    name = "podman"
    tool = "podman"

    def podman(self, host: Host, *args: str) -> list[str]:
        argv = ["podman", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        if self.workload.podman_root:
            argv += ["--root", self.workload.podman_root]
        if self.workload.podman_runroot:
            argv += ["--runroot", self.workload.podman_runroot]
        if host.config.criu != "criu":
            argv += ["--runtime-flag", f"criu={host.config.criu}"]
        return [*argv, *args]

    def _inspect(self, host: Host) -> list[str]:
        argv = self.podman(host, "container", "inspect", "--format", _FORMAT, self.container)
        r = host.run(argv, mutates=False)
        return r.stdout.split() if r.ok else []

    def status(self, host: Host) -> tuple[str, int]:
        fields = self._inspect(host)
        if not fields:
            return procs.GONE, 0
        state = _STATES.get(fields[0], procs.STOPPED)
        pid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        return state, pid

    def more_preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        fields = self._inspect(src)
        image = fields[2] if len(fields) > 2 else ""
        if image and not dst.run(self.podman(dst, "image", "exists", image), mutates=False).ok:
            return [
                f"podman image {image} (the base of container {self.container}) is not on "
                f"{dst}: load it there first (podman load / podman import)"
            ]
        return []

    def checkpoint(
        self,
        host: Host,
        target: Target,
        images_dir: str,
        page_port: int | None = None,
        lazy_port: int | None = None,
        prev_images_dir: str | None = None,
        channel: PageChannel | None = None,  # #14: no page server here
    ) -> None:
        export = f"{images_dir}/{EXPORT}"
        argv = self.podman(host, "container", "checkpoint", *KEEP, "--export", export,
                           self.container)  # fmt: skip
        r = detached(host, argv, f"{images_dir}/{ERR}")
        criu_failed(host, r, images_dir, criu.DUMP_LOG, "dump (podman container checkpoint)")

    def restore(self, host: Host, target: Target, images_dir: str, lazy: bool = False) -> int:
        export = f"{images_dir}/{EXPORT}"
        argv = self.podman(host, "container", "restore", *KEEP, "--import", export)
        r = detached(host, argv, f"{images_dir}/{ERR}")
        if not r.ok:
            host.run(self.podman(host, "rm", "--force", "--ignore", self.container))
        criu_failed(host, r, images_dir, criu.RESTORE_LOG, "restore (podman container restore)")
        return self.running_pid(host, "podman container restore")

    def checkpointed(self, host: Host, images_dir: str) -> bool:
        done = host.run(["test", "-s", f"{images_dir}/{EXPORT}"], mutates=False).ok
        return done and self.status(host)[0] != procs.RUNNING

    def resume(self, host: Host, target: Target, images_dir: str) -> None:
        state, pid = self.status(host)
        if state == procs.RUNNING:  # the checkpoint failed: Podman let it run on
            target.root_pid = pid
            return
        export = f"{images_dir}/{EXPORT}"
        if not host.run(["test", "-s", export], mutates=False).ok:
            raise MigrationError(
                f"podman container {self.container} is {state} on {host} and there is no "
                f"export ({export}) to restore it from: start it by hand"
            )
        host.run(self.podman(host, "rm", "--force", "--ignore", self.container))
        target.root_pid = self.restore(host, target, images_dir)

    def remove(self, host: Host, root_pid: int) -> None:
        if self.status(host)[0] != procs.GONE:
            host.run(self.podman(host, "rm", "--force", "--ignore", self.container), check=True)
