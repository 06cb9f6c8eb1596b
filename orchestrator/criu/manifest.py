"""Image checksums (issue #14): recorded on the source after the dump, verified on the
destination before the restore, so that a tampered or truncated image is refused (and the
migration rolled back) instead of restored.

The source hashes every file the final dump wrote (images, a runtime's export; not logs) with
BLAKE2b (coreutils `cksum -a blake2b`) in the background while rsync sends them, so that the
hashing overlaps the transfer instead of adding to the freeze. The controller keeps the
digests (never a file on either host that could be rewritten together with the images) and
hands them to the destination's check as arguments.

Pre-copy's rounds (IMAGES/1, 2, ...) are hashed the same way while each is rsynced; the
destination checks them all, with the final dump, from the image root. Not covered: a stream
dump's pages, which the destination's page server writes itself (they come over the
authenticated page channel, see pagechannel.py), and post-copy's pages, which go straight into
the restored workload's memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host

ALGO = "blake2b"
FILE = "images.b2sums"  # written by the source's hashing job, inside the image dir

# A line of `cksum -a blake2b` (tagged) output: BLAKE2b (./path) = HEX
_LINE = re.compile(r"^BLAKE2b \((\./.+)\) = ([0-9a-f]{128})$")

# $1 dir, $2 output file, $3 the image root: make every file there root-only (CRIU writes
# images 0644; rsync then carries 0600), then hash every file under dir, detached; the output
# appears whole.
_START = r"""
umask 077
chmod -R go= -- "$3" || exit 1
cd -- "$1" || exit 1
rm -f -- "$2" "$2.tmp"
( find . -type f ! -name '*.log' ! -name '*.err' ! -name '*.rc' ! -name "$2*" -print0 |
  sort -z | xargs -0r cksum -a blake2b >"$2.tmp" &&
  mv -f -- "$2.tmp" "$2" || echo failed >"$2.failed" ) </dev/null >/dev/null 2>&1 &
"""

# $1 file, $2 seconds: print the hashes once they are there.
_COLLECT = r"""
end=$(( $(date +%s) + $2 ))
while [ ! -e "$1" ]; do
  [ -e "$1.failed" ] && { echo "hashing the images failed" >&2; exit 1; }
  [ "$(date +%s)" -ge "$end" ] && { echo "hashing the images took too long" >&2; exit 1; }
  sleep 0.05
done
cat -- "$1" && rm -f -- "$1"
"""

# $1 dir, then the expected lines: check each named file (missing counts as bad).
# $1 the image root (made root-only first: pre-copy rounds, a page server's pages), $2 dir,
# then the expected lines.
_VERIFY = r"""
chmod -R go= -- "$1" || exit 1; shift
cd -- "$1" || exit 1; shift
[ "$#" -gt 0 ] || exit 0
out=$(printf '%s\n' "$@" | cksum -a blake2b --check --strict - 2>&1); rc=$?
printf '%s\n' "$out" | grep -v ': OK$' >&2
exit $rc
"""


@dataclass(frozen=True)
class Manifest:
    """What the source dumped: relative path -> BLAKE2b digest."""

    digests: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Manifest:
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            m = _LINE.match(line.strip())
            if not m or ".." in m.group(1).split("/"):
                raise MigrationError(f"unexpected line hashing the images: {line[:120]!r}")
            out.append((m.group(1), m.group(2)))
        return cls(tuple(out))

    def under(self, subdir: str) -> Manifest:
        """The same files, named relative to the parent of the dir they were hashed in."""
        if not subdir:
            return self
        return Manifest(tuple((f"./{subdir}/{p[2:]}", d) for p, d in self.digests))

    def merged(self, other: Manifest) -> Manifest:
        return Manifest(self.digests + other.digests)

    def lines(self) -> list[str]:
        return [f"BLAKE2b ({path}) = {digest}" for path, digest in self.digests]

    def __len__(self) -> int:
        return len(self.digests)


def start_argv(images_dir: str, root: str) -> list[str]:
    """Run on the source: make root's files root-only, start hashing images_dir's files in
    the background."""
    return ["sh", "-c", _START, "sh", images_dir, FILE, root]


def collect_argv(images_dir: str, seconds: float) -> list[str]:
    """Run on the source: wait for the hashes and print them."""
    return ["sh", "-c", _COLLECT, "sh", f"{images_dir}/{FILE}", str(int(max(1, seconds)))]


def verify_argv(images_dir: str, manifest: Manifest, root: str) -> list[str]:
    """Run on the destination: make root's files root-only, check every recorded image
    (non-zero exit on any mismatch)."""
    return ["bash", "-c", _VERIFY, "bash", root, images_dir, *manifest.lines()]


def start(host: Host, images_dir: str, root: str) -> None:
    r = host.run(start_argv(images_dir, root))
    if not r.ok:
        raise MigrationError(f"cannot hash the images on {host}: {r.error_line()}")


def collect(host: Host, images_dir: str) -> Manifest:
    r = host.run(collect_argv(images_dir, host.policy.command_timeout - 5))
    if r.dry:
        return Manifest()
    if not r.ok:
        raise MigrationError(f"cannot hash the images on {host}: {r.error_line()}")
    return Manifest.parse(r.stdout)


def verify(host: Host, images_dir: str, manifest: Manifest, source: str, root: str) -> None:
    """Refuse to restore from images that are not what the source dumped."""
    r = host.run(verify_argv(images_dir, manifest, root))
    if r.ok or r.dry:
        return
    bad = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    shown = "; ".join(bad[:3]) or f"exit {r.exit_code}"
    raise MigrationError(
        f"images on {host} in {images_dir} are not what {source} dumped (tampered, truncated "
        f"or missing): {shown}. Refusing to restore them",
        details=bad,
    )
