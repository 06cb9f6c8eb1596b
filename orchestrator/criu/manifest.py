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

ALGO = "crc"  # cksum -a: crc (CRC-32 and size) is what the parser reads

# A line of `cksum -a crc` output: CRC SIZE ./path
_LINE = re.compile(r"^(\d+) (\d+) (\./.+)$")

# Run on the destination (through the source's ssh link): make the image root $1 root-only
# (pre-copy rounds, a page server's pages), then sum the files named on stdin, one a line,
# relative to it ($2: the algorithm). A missing file is named on stderr and left out of stdout:
# the controller compares.
_DST_SUM = r"""
chmod -R go= -- "$1" && cd -- "$1" || exit 1
xargs -r -d '\n' cksum -a "$2" --
exit 0
"""

# Run on the source, around a push: still one command (inside the freeze for the final one).
# $1 the dir pushed, $2 its name under the image root ('' or 'final' or a round's number), $3
# the source's image root, $4 the algorithm, $5 files already summed (pre-copy rounds, one a
# line), $6 how many arguments the destination's command has (0: none), then that command
# (_DST_SUM through the link), then rsync's argv. Makes the images root-only, sums them (into a
# temporary file outside the dir rsync reads) while rsync sends them, then has the destination
# sum its copies; prints rsync's output, then both sets of sums. rsync's exit code.
_AROUND_PUSH = r"""
dir=$1 sub=$2 root=$3 algo=$4 before=$5 n=$6; shift 6
dst=("${@:1:n}"); shift "$n"
umask 077
chmod -R go= -- "$root" || exit 1
sums=$(mktemp -t migrate-sums.XXXXXX) || exit 1
trap 'rm -f -- "$sums" "$sums.failed"' EXIT
( cd -- "$dir" && find . -type f ! -name '*.log' ! -name '*.err' ! -name '*.rc' -print0 |
  sort -z | xargs -0r cksum -a "$algo" >"$sums" || echo failed >"$sums.failed"
) </dev/null >/dev/null 2>&1 &
"$@"; rc=$?
wait
[ "$rc" -eq 0 ] || exit "$rc"
[ ! -e "$sums.failed" ] || { echo "summing the images on the source failed" >&2; exit 1; }
echo "#14 source sums"
cat -- "$sums"
echo "#14 destination sums"
[ "$n" -gt 0 ] || exit 0
list=$( { [ -n "$before" ] && printf '%s\n' "$before"
          sed "s|^[0-9]* [0-9]* \./|./${sub:+$sub/}|" -- "$sums"; } )
[ -n "$list" ] || exit 0
printf '%s\n' "$list" | "${dst[@]}"; rc=$?
[ "$rc" -eq 0 ] || { echo "cannot sum the images on the destination (exit $rc)" >&2; exit "$rc"; }
"""

# $1 root, $2 algorithm, then the paths to sum: as _DST_SUM, with the paths as arguments.
_DST_SUM_ARGS = r"""
root=$1 algo=$2; shift 2
chmod -R go= -- "$root" && cd -- "$root" || exit 1
[ "$#" -eq 0 ] || cksum -a "$algo" -- "$@"
exit 0
"""

_SRC_MARK = "#14 source sums"
_DST_MARK = "#14 destination sums"


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


def dst_sum_argv(root: str) -> list[str]:
    """Run on the destination: make root's files root-only, sum the files named on stdin."""
    return ["sh", "-c", _DST_SUM, "sh", root, ALGO]


def around_push(
    push: list[str], images_dir: str, subdir: str, root: str, dst: list[str],
    before: Manifest | None,
) -> list[str]:  # fmt: skip
    """Run on the source: the push (rsync argv), with the sums of what it sends (made on the
    source while it runs) and, unless dst is empty, of what arrived (`dst`: dst_sum_argv
    through the link, for the files sent now and those in `before`)."""
    done = "\n".join(before.paths()) if before else ""
    return ["bash", "-c", _AROUND_PUSH, "bash", images_dir, subdir, root, ALGO, done,
            str(len(dst)), *dst, *push]  # fmt: skip


def pushed(argv: list[str]) -> list[str]:
    """The push inside an around_push argv (argv itself if it is not one): for test doubles."""
    if argv[:3] != ["bash", "-c", _AROUND_PUSH]:
        return argv
    return argv[10 + int(argv[9]) :]


def split_push(stdout: str) -> tuple[str, Manifest | None, Manifest | None]:
    """around_push's output: rsync's own, the source's sums, the destination's (None: absent,
    as in a dry run)."""
    if _SRC_MARK not in stdout:
        return stdout, None, None
    head, _, rest = stdout.partition(_SRC_MARK)
    src_text, _, dst_text = rest.partition(_DST_MARK)
    return head, Manifest.parse(src_text), Manifest.parse(dst_text)


def sent(stdout: str, subdir: str) -> Manifest:
    """The source's sums from an around_push's output, named from the image root."""
    _, src, _ = split_push(stdout)
    return src.under(subdir) if src is not None else Manifest()


def check(
    stdout: str, before: Manifest | None, subdir: str, source: str, dest: str, root: str
) -> Manifest | None:
    """Compare what the source dumped (and, pre-copy, sent before) with what the destination
    holds; the whole manifest. MigrationError (so: rollback, no restore) on any difference."""
    _, src, dst = split_push(stdout)
    if src is None or dst is None:
        return before
    want = (before or Manifest()).merged(src.under(subdir))
    if not want:
        raise MigrationError(f"the dump on {source} left no image to check")
    refuse_differences(want, dst, source, dest, root)
    return want


def refuse_differences(want: Manifest, got: Manifest, source: str, dest: str, root: str) -> None:
    """MigrationError (so: rollback, no restore) naming what got lacks or holds otherwise."""
    bad = want.differences(got)
    if bad:
        shown = "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
        raise MigrationError(
            f"images on {dest} in {root} are not what {source} dumped: {shown}. "
            "Refusing to restore them",
            details=bad,
        )


def of_files(files: dict[str, list[int]], subdir: str) -> Manifest:
    """An agent's account of an image dir it sent or received (relative path -> [CRC-32,
    size]), named from the image root like the sums above."""
    digests = tuple((f"./{p}", f"{crc} {size}") for p, (crc, size) in sorted(files.items()))
    return Manifest(digests).under(subdir)


def dst_sum_paths_argv(root: str, paths: list[str]) -> list[str]:
    """Run on the destination: make root's files root-only, sum the named files (relative to
    root); a missing one is named on stderr and left out."""
    return ["sh", "-c", _DST_SUM_ARGS, "sh", root, ALGO, *paths]
