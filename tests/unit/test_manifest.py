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


def record(images: Path) -> Manifest:
    final = str(images / "final")
    assert sh(manifest.start_argv(final, str(images))).returncode == 0
    r = sh(manifest.collect_argv(final, 30))
    assert r.returncode == 0, r.stderr
    return Manifest.parse(r.stdout).under("final")


def check(images: Path, m: Manifest) -> list[str]:
    """What the destination's sums say is wrong (the controller's comparison)."""
    r = sh(manifest.sum_argv(str(images), m))
    assert r.returncode == 0, r.stderr
    return m.differences(Manifest.parse(r.stdout))


def test_record_then_verify(images: Path) -> None:
    m = record(images)
    assert m.paths() == ["./final/core-7.img", "./final/pages-1.img"]  # files, not the log
    assert not (images / "final" / manifest.FILE).exists()  # collected and removed
    # Made root-only on the way: CRIU writes its images 0644.
    assert all(p.stat().st_mode & 0o077 == 0 for p in images.rglob("*") if not p.is_symlink())
    assert check(images, m) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_verify_refuses_a_damaged_image(images: Path, damage: str) -> None:
    m = record(images)
    pages = images / "final" / "pages-1.img"
    if damage == "flip":
        data = bytearray(pages.read_bytes())
        data[5000] ^= 0x01
        pages.write_bytes(bytes(data))
    elif damage == "truncate":
        pages.write_bytes(pages.read_bytes()[:-4096])
    else:
        pages.unlink()
    bad = check(images, m)
    assert len(bad) == 1 and bad[0].startswith("./final/pages-1.img: "), bad
    assert {"flip": "content differs", "truncate": "not 1048576", "remove": "missing"}[
        damage
    ] in bad[0]


def test_no_files_is_an_empty_manifest(tmp_path: Path) -> None:
    assert sh(manifest.start_argv(str(tmp_path), str(tmp_path))).returncode == 0
    r = sh(manifest.collect_argv(str(tmp_path), 30))
    assert r.returncode == 0 and Manifest.parse(r.stdout) == Manifest()
    assert check(tmp_path, Manifest()) == []


def test_rounds_and_final_are_checked_from_the_root(images: Path) -> None:
    """Pre-copy: each round summed in its own dir, the final dump in `final`; the destination
    checks them all from the image root."""
    root = str(images)
    assert sh(manifest.start_argv(str(images / "1"), root)).returncode == 0
    round1 = Manifest.parse(sh(manifest.collect_argv(str(images / "1"), 30)).stdout).under("1")
    both = round1.merged(record(images))
    assert both.paths() == ["./1/pages-1.img", "./final/core-7.img", "./final/pages-1.img"]
    assert check(images, both) == []
    (images / "1" / "pages-1.img").write_bytes(b"round one" * 999 + b"ROUND ONE")
    assert check(images, both) == ["./1/pages-1.img: content differs (checksum)"]
