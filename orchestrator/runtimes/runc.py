"""Runtime `runc`: an OCI container, moved with `runc checkpoint` / `runc restore`.

The bundle (config.json and rootfs) travels with the images, mirrored to the same path on the
destination. `runc checkpoint` ends the source container once its images are written (runc
cannot leave it stopped: pausing it first would freeze its cgroup, which the restored copy
re-enters under the same path); those images ARE the source copy from then on: a rollback
restores it on the source from them (`runc restore`), and confirm has nothing left to kill.

The container's stdio must be /dev/null or pipes: CRIU cannot restore a regular host file
as stdio ("Can't lookup mount ... for fd"); pre-flight refuses that before anything freezes.
"""

from __future__ import annotations

import json

from orchestrator.criu import commands as criu
from orchestrator.criu.pagechannel import PageChannel
from orchestrator.errors import MigrationError
from orchestrator.runtimes import procs
from orchestrator.runtimes.base import Target
from orchestrator.runtimes.container import ContainerRuntime, criu_failed, detached
from orchestrator.transport.ssh import Host

ROOT = "/run/runc"
ERR = "runc.err"
# As LXC does by default: established TCP connections and file locks travel (no-ops without).
KEEP = ("--tcp-established", "--file-locks")
BUNDLE = "bundle.path"  # in the image directory: where the bundle was
_NOTE = 'printf "%s\\n" "$2" > "$1" && shift 2 && exec "$@"'
_STATES = {"running": procs.RUNNING, "paused": procs.STOPPED, "created": procs.STOPPED}
# fds 0-2 of a pid, one "N TARGET" a line.
_STDIO = 'for n in 0 1 2; do printf "%s %s\\n" "$n" "$(readlink "/proc/$1/fd/$n")"; done'


class RuncRuntime(ContainerRuntime):
    name = "runc"
    tool = "runc"

    def runc(self, host: Host) -> list[str]:
        argv = ["runc", "--root", self.workload.runc_root or ROOT]
        if host.config.criu != "criu":
            argv += ["--criu", host.config.criu]
        return argv

    def _state(self, host: Host) -> dict[str, object]:
        r = host.run([*self.runc(host), "state", self.container], mutates=False)
        if not r.ok:
            return {}
        data = json.loads(r.stdout)
        return data if isinstance(data, dict) else {}

    def status(self, host: Host) -> tuple[str, int]:
        data = self._state(host)
        state = _STATES.get(str(data.get("status")), procs.GONE)
        pid = data.get("pid")
        return state, pid if isinstance(pid, int) and state != procs.GONE else 0

    def bundle(self, host: Host) -> str:
        return self.workload.bundle or str(self._state(host).get("bundle") or "")

    def paths(self, host: Host, pid: int) -> list[str]:
        bundle = self.bundle(host)
        if not bundle.startswith("/"):
            raise MigrationError(f"runc container {self.container}: no bundle path on {host}")
        return [bundle]

    def more_preflight(self, src: Host, dst: Host, target: Target) -> list[str]:
        r = src.run(["sh", "-c", _STDIO, "sh", str(target.root_pid)], mutates=False)
        problems = []
        for line in r.stdout.splitlines():
            fd, _, path = line.partition(" ")
            if path.startswith("/") and path != "/dev/null" and not path.startswith("/dev/"):
                problems.append(
                    f"runc container {self.container}: its fd {fd} is the file {path} on "
                    f"{src.name}; CRIU cannot restore a regular host file as stdio: start it "
                    "with stdio to /dev/null or a pipe"
                )
        return problems

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
        argv = [*self.runc(host), "checkpoint", *KEEP, "--image-path", images_dir, "--work-path",
                images_dir, self.container]  # fmt: skip
        # The bundle's path goes with the images: a recover restores from them without a journal
        # entry for it, once the checkpointed container is gone from runc.
        note = ["sh", "-c", _NOTE, "sh", f"{images_dir}/{BUNDLE}", target.paths[0], *argv]
        r = detached(host, note, f"{images_dir}/{ERR}")
        criu_failed(host, r, images_dir, criu.DUMP_LOG, "dump (runc checkpoint)")

    def restore(self, host: Host, target: Target, images_dir: str, lazy: bool = False) -> int:
        bundle = target.paths[0] if target.paths else self.bundle(host)
        if not bundle:
            bundle = host.run(["cat", "--", f"{images_dir}/{BUNDLE}"], mutates=False).stdout.strip()
        argv = [*self.runc(host), "restore", "-d", *KEEP, "--image-path", images_dir, "--work-path",
                images_dir, "--bundle", bundle, self.container]  # fmt: skip
        r = detached(host, argv, f"{images_dir}/{ERR}")
        if not r.ok:
            host.run([*self.runc(host), "delete", "--force", self.container])
        criu_failed(host, r, images_dir, criu.RESTORE_LOG, "restore (runc restore)")
        return self.running_pid(host, "runc restore")

    def checkpointed(self, host: Host, images_dir: str) -> bool:
        done = host.run(["test", "-s", f"{images_dir}/inventory.img"], mutates=False).ok
        return done and self.status(host)[0] == procs.GONE

    def resume(self, host: Host, target: Target, images_dir: str) -> None:
        state, pid = self.status(host)
        if state == procs.RUNNING:  # the checkpoint failed: runc let it run on
            target.root_pid = pid
            return
        target.root_pid = self.restore(host, target, images_dir)

    def remove(self, host: Host, root_pid: int) -> None:
        if self.status(host)[0] != procs.GONE:
            host.run([*self.runc(host), "delete", "--force", self.container])
