"""Where one migration's images live on a host: its root, pre-copy's rounds, the final dump;
and the private directories that hold them (process memory: 0700, removed at the end)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host

FINAL = "final"  # after pre-copy rounds 1..N, the final dump's subdir
ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{6}$")
# sun_path holds 108 bytes; ssh appends ".XXXXXXXXXXXXXXXX" to a control path while binding it.
SOCKET_MAX = 108 - 1 - 17
#: A Unix socket's path (sun_path), less the terminating NUL.
SUN_PATH_MAX = 107


@dataclass(frozen=True)
class ImageLayout:
    """The image dirs of one migration on one host.

    Without pre-copy the dump writes into `root`. With N pre-copy rounds, round n writes into
    `root/n` on top of `root/n-1`, and the final dump into `root/final` on top of `root/N`."""

    root: str
    rounds: int = 0

    @classmethod
    def under(cls, workdir: str, migration_id: str) -> ImageLayout:
        """The layout for a migration id under a host's workdir (the id is checked: it comes
        from journals too, and becomes a path that is removed)."""
        if not ID_RE.match(migration_id):
            raise MigrationError(f"not a migration id: {migration_id!r}")
        return cls(f"{workdir.rstrip('/')}/images/{migration_id}")

    def round(self, n: int) -> str:
        return f"{self.root}/{n}"

    @staticmethod
    def parent_of_round(n: int) -> str | None:
        """Round n's parent, relative to its dir (none for the first)."""
        return f"../{n - 1}" if n > 1 else None

    def after_rounds(self, n: int) -> ImageLayout:
        return replace(self, rounds=n)

    @property
    def final(self) -> str:
        """Where the final dump writes (source) and restore reads (destination)."""
        return f"{self.root}/{FINAL}" if self.rounds else self.root

    @property
    def final_name(self) -> str:
        """The final dump's dir relative to the root ("" without rounds)."""
        return FINAL if self.rounds else ""

    @property
    def final_parent(self) -> str | None:
        return f"../{self.rounds}" if self.rounds else None

    @property
    def subdirs(self) -> list[str]:
        """Every round's dir and the final one (empty without rounds)."""
        if not self.rounds:
            return []
        return [*(self.round(n) for n in range(1, self.rounds + 1)), self.final]

    @property
    def link_socket(self) -> str | None:
        """Control socket (source) for its ssh link to the destination (None: path too long)."""
        path = f"{self.root.rsplit('/images/', 1)[0]}/images/ssh-{self.root.rsplit('/', 1)[1]}"
        return path if len(path) <= SOCKET_MAX else None

    @property
    def pipe_socket(self) -> str | None:
        """The image pipe's root-only socket (phases/imagepipe.py; None: path too long)."""
        path = f"{self.root}/images.sock"
        return path if len(path.encode()) <= SUN_PATH_MAX else None

    def contains(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")


def make_private_dir(host: Host, path: str) -> None:
    """Create path (and parents) as 0700: image directories hold process memory."""
    host.run(["sh", "-c", 'umask 077 && mkdir -p -- "$1"', "sh", path], check=True)


def remove_dir(host: Host, path: str) -> None:
    host.run(["rm", "-rf", "--", path])
