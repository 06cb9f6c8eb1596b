"""Image checksums (#14): parsing and comparing, and the source's and destination's scripts
run for real on this machine (coreutils cksum) on a small fake image dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.criu import manifest
from orchestrator.criu.manifest import Manifest
from orchestrator.errors import MigrationError


def test_parse_and_compare() -> None:
    m = Manifest.parse("123 4096 ./pages-1.img\n77 10 ./core-7.img\n")
    assert m.digests == (("./pages-1.img", "123 4096"), ("./core-7.img", "77 10"))
    assert m.paths() == ["./pages-1.img", "./core-7.img"]
    assert len(Manifest.parse("")) == 0
    assert m.differences(m) == []
    got = Manifest.parse("124 4096 ./pages-1.img\n")
    assert m.differences(got) == ["./pages-1.img: content differs (checksum)",
                                  "./core-7.img: missing"]  # fmt: skip
    short = Manifest.parse("123 0 ./pages-1.img\n77 10 ./core-7.img")
    assert m.differences(short) == ["./pages-1.img: 0 bytes, not 4096 (truncated or grown)"]
    assert m.under("final").paths() == ["./final/pages-1.img", "./final/core-7.img"]


@pytest.mark.parametrize(
    "line",
    [
        "BLAKE2b (./x.img) = abc",  # another algorithm's output
        "123 4096 /abs/x.img",  # not relative to the image dir
        "123 4096 ./../x.img",  # outside it
        "123 ./x.img",  # no size
        "cksum: ./x.img: No such file or directory",
    ],
)
def test_parse_refuses_odd_lines(line: str) -> None:
    with pytest.raises(MigrationError):
        Manifest.parse(line)


def sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    final = root / "final"
    final.mkdir(parents=True)
    (root / "1").mkdir()
    (root / "1" / "pages-1.img").write_bytes(b"round one" * 1000)
    (final / "pages-1.img").write_bytes(bytes(range(256)) * 4096)
    (final / "core-7.img").write_bytes(b"core")
    (final / "dump.log").write_text("a log changes: not hashed")
    (final / "parent").symlink_to("../1")
    for p in root.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def push_with_sums(
    src: Path, dst: Path, copy: str, sub: str = "", root: Path | None = None,
    dst_root: Path | None = None, before: Manifest | None = None, check_dst: bool = True,
) -> str:  # fmt: skip
    """around_push on this machine: `copy` ($1 -> $2) stands in for rsync, and the
    destination's command runs here instead of through ssh."""
    push = ["sh", "-c", copy, "sh", str(src), str(dst)]
    dst_cmd = manifest.dst_sum_argv(str(dst_root or dst)) if check_dst else []
    argv = manifest.around_push(push, str(src), sub, str(root or src), dst_cmd, before)
    r = sh(argv)
    assert r.returncode == 0, r.stderr
    return r.stdout


COPY = 'printf "rsync says: Total bytes sent: 42\\n"; cp -a "$1"/. "$2"/'


@pytest.fixture
def pair(images: Path, tmp_path: Path) -> tuple[Path, Path]:
    dst = tmp_path / "dst"
    dst.mkdir()
    return images / "final", dst


def test_push_sums_both_sides_in_one_command(images: Path, pair: tuple[Path, Path]) -> None:
    src, dst = pair
    out = push_with_sums(src, dst, COPY, root=images)
    head, got_src, got_dst = manifest.split_push(out)
    assert "Total bytes sent: 42" in head
    assert got_src is not None and got_src.paths() == ["./core-7.img", "./pages-1.img"]
    assert got_dst == got_src  # (the log is not summed)
    assert manifest.check(out, None, "", "a", "b", str(dst)) == got_src
    # Made root-only on the way (CRIU writes its images 0644), on both hosts.
    for top in (images, dst):
        assert all(p.stat().st_mode & 0o077 == 0 for p in top.rglob("*") if not p.is_symlink())
    assert sorted(p.name for p in dst.iterdir()) == ["core-7.img", "dump.log", "pages-1.img",
                                                     "parent"]  # fmt: skip


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_image_is_refused(pair: tuple[Path, Path], damage: str) -> None:
    src, dst = pair
    harm = {
        "flip": 'printf X | dd of="$2"/pages-1.img bs=1 seek=5000 conv=notrunc 2>/dev/null',
        "truncate": 'truncate -s -4096 "$2"/pages-1.img',
        "remove": 'rm "$2"/pages-1.img',
    }[damage]
    out = push_with_sums(src, dst, f"{COPY} && {harm}")
    with pytest.raises(MigrationError) as e:
        manifest.check(out, None, "", "host-a", "host-b", str(dst))
    want = {
        "flip": "content differs",
        "truncate": "1044480 bytes, not 1048576",
        "remove": "missing",
    }[damage]
    assert f"./pages-1.img: {want}" in str(e.value)
    assert "Refusing to restore" in str(e.value)


def test_rounds_sent_before_are_checked_with_the_final_push(images: Path, tmp_path: Path) -> None:
    """Pre-copy: each round summed by its own push (no check yet); the final push has the
    destination sum the rounds again with the final dump's files, at the image root."""
    dst = tmp_path / "dst"
    (dst / "1").mkdir(parents=True)
    (dst / "final").mkdir()
    out = push_with_sums(images / "1", dst / "1", COPY, sub="1", root=images, check_dst=False)
    round1 = manifest.sent(out, "1")
    assert round1.paths() == ["./1/pages-1.img"]
    assert manifest.split_push(out)[2] == Manifest()  # no destination sums for a round
    (dst / "1" / "pages-1.img").write_bytes(b"round one" * 999 + b"ROUND ONE")  # damaged
    final = ("final", images, dst)
    out = push_with_sums(images / "final", dst / "final", COPY, *final, before=round1)
    with pytest.raises(MigrationError) as e:
        manifest.check(out, round1, "final", "a", "b", str(dst))
    assert "./1/pages-1.img: content differs" in str(e.value)
    (dst / "1" / "pages-1.img").write_bytes((images / "1" / "pages-1.img").read_bytes())
    out = push_with_sums(images / "final", dst / "final", COPY, *final, before=round1)
    whole = manifest.check(out, round1, "final", "a", "b", str(dst))
    assert whole is not None and whole.paths() == [
        "./1/pages-1.img", "./final/core-7.img", "./final/pages-1.img"]  # fmt: skip


def test_nothing_to_check_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "d").mkdir()
    out = push_with_sums(tmp_path / "s", tmp_path / "d", COPY)
    with pytest.raises(MigrationError, match="left no image"):
        manifest.check(out, None, "", "a", "b", str(tmp_path / "d"))
    assert manifest.check("dry run: no output", None, "", "a", "b", "/d") is None


def test_the_push_inside_is_found_again() -> None:
    push = ["rsync", "-a", "x/", "h:y/"]
    argv = manifest.around_push(push, "/i", "", "/i", ["ssh", "h", "cmd"], None)
    assert manifest.pushed(argv) == push
    assert manifest.pushed(push) == push
