"""Image checksums (issue #14): recorded on the source after the dump, verified on the
destination before the restore, so that a damaged, truncated, missing or altered image is
refused (and the migration rolled back) instead of restored.

The source sums every file the final dump wrote (images, a runtime's export; not logs) with
CRC-32 and its size (coreutils `cksum -a crc`), in the background while rsync sends them, so
that the summing overlaps the transfer instead of adding to the freeze. The controller keeps the
sums (never a file on either host that could be rewritten together with the images); the
destination sums its copies just before the restore and the controller compares.

Why CRC-32 and not a cryptographic hash: the check runs inside the freeze on the destination,
and on these hosts BLAKE2b (`cksum -a blake2b`) took ~3 s per GiB, CRC-32 ~0.4 s. Who could
forge a CRC here must write the 0700 root image dirs, that is be root on a host, who can as well
change the restored process itself; what the check catches is every single flipped byte or
burst up to 32 bits, truncation and loss (the size), in transit or at rest. `ALGO` switches.

Pre-copy's rounds (IMAGES/1, 2, ...) are summed the same way while each is rsynced; the
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

ALGO = "crc"  # cksum -a: crc (CRC-32 and size) is what the parser reads
FILE = "images.cksums"  # written by the source's summing job, inside the image dir

# A line of `cksum -a crc` output: CRC SIZE ./path
_LINE = re.compile(r"^(\d+) (\d+) (\./.+)$")

# $1 dir, $2 output file, $3 the image root, $4 algorithm: make every file there root-only
# (CRIU writes images 0644; rsync then carries 0600), then sum every file under dir but logs,
# detached; the output appears whole.
_START = r"""
umask 077
chmod -R go= -- "$3" || exit 1
cd -- "$1" || exit 1
rm -f -- "$2" "$2.tmp" "$2.failed"
( find . -type f ! -name '*.log' ! -name '*.err' ! -name '*.rc' ! -name "$2*" -print0 |
  sort -z | xargs -0r cksum -a "$4" >"$2.tmp" &&
  mv -f -- "$2.tmp" "$2" || echo failed >"$2.failed" ) </dev/null >/dev/null 2>&1 &
"""

# $1 file, $2 seconds: print the sums once they are there.
_COLLECT = r"""
end=$(( $(date +%s) + $2 ))
while [ ! -e "$1" ]; do
  [ -e "$1.failed" ] && { echo "summing the images failed" >&2; exit 1; }
  [ "$(date +%s)" -ge "$end" ] && { echo "summing the images took too long" >&2; exit 1; }
  sleep 0.05
done
cat -- "$1" && rm -f -- "$1"
"""

# $1 the image root (made root-only first: pre-copy rounds, a page server's pages), $2 the
# algorithm, then the files to sum (relative to the root). A missing file is named on stderr
# and left out of stdout: the controller compares.
_SUM = r"""
chmod -R go= -- "$1" || exit 1
cd -- "$1" || exit 1
algo=$2; shift 2
[ "$#" -gt 0 ] || exit 0
cksum -a "$algo" -- "$@"
exit 0
"""


@dataclass(frozen=True)
class Manifest:
    """What the source dumped: relative path -> "CRC SIZE"."""

    digests: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Manifest:
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            m = _LINE.match(line.strip())
            if not m or ".." in m.group(3).split("/"):
                raise MigrationError(f"unexpected line summing the images: {line[:120]!r}")
            out.append((m.group(3), f"{m.group(1)} {m.group(2)}"))
        return cls(tuple(out))

    def paths(self) -> list[str]:
        return [path for path, _ in self.digests]

    def differences(self, got: Manifest) -> list[str]:
        """What is wrong with got (the destination's sums), one line per file."""
        have = dict(got.digests)
        out = []
        for path, want in self.digests:
            if path not in have:
                out.append(f"{path}: missing")
                continue
            crc, size = want.split()
            gcrc, gsize = have[path].split()
            if gsize != size:
                out.append(f"{path}: {gsize} bytes, not {size} (truncated or grown)")
            elif gcrc != crc:
                out.append(f"{path}: content differs (checksum)")
        return out

    def under(self, subdir: str) -> Manifest:
        """The same files, named relative to the parent of the dir they were hashed in."""
        if not subdir:
            return self
        return Manifest(tuple((f"./{subdir}/{p[2:]}", d) for p, d in self.digests))

    def merged(self, other: Manifest) -> Manifest:
        return Manifest(self.digests + other.digests)

    def __len__(self) -> int:
        return len(self.digests)


def start_argv(images_dir: str, root: str) -> list[str]:
    """Run on the source: make root's files root-only, start summing images_dir's files in
    the background."""
    return ["sh", "-c", _START, "sh", images_dir, FILE, root, ALGO]


def collect_argv(images_dir: str, seconds: float) -> list[str]:
    """Run on the source: wait for the sums and print them."""
    return ["sh", "-c", _COLLECT, "sh", f"{images_dir}/{FILE}", str(int(max(1, seconds)))]


def sum_argv(root: str, manifest: Manifest) -> list[str]:
    """Run on the destination: make root's files root-only, sum the files the manifest names."""
    return ["sh", "-c", _SUM, "sh", root, ALGO, *manifest.paths()]


def start(host: Host, images_dir: str, root: str) -> None:
    r = host.run(start_argv(images_dir, root))
    if not r.ok:
        raise MigrationError(f"cannot sum the images on {host}: {r.error_line()}")


def collect(host: Host, images_dir: str) -> Manifest:
    r = host.run(collect_argv(images_dir, host.policy.command_timeout - 5))
    if r.dry:
        return Manifest()
    if not r.ok:
        raise MigrationError(f"cannot sum the images on {host}: {r.error_line()}")
    return Manifest.parse(r.stdout)


def verify(host: Host, root: str, manifest: Manifest, source: str) -> None:
    """Refuse to restore from images that are not what the source dumped."""
    r = host.run(sum_argv(root, manifest))
    if r.dry:
        return
    if not r.ok:
        raise MigrationError(f"cannot check the images on {host}: {r.error_line()}")
    bad = manifest.differences(Manifest.parse(r.stdout))
    if bad:
        shown = "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
        raise MigrationError(
            f"images on {host} in {root} are not what {source} dumped: {shown}. "
            "Refusing to restore them",
            details=bad,
        )
