"""Image checksums (#14): parsing, and the source's and destination's scripts run for real on
this machine (coreutils cksum) on a small fake image dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.criu import manifest
from orchestrator.criu.manifest import Manifest
from orchestrator.errors import MigrationError

DIGEST = "a" * 128


def test_parse_and_lines_round_trip() -> None:
    text = f"BLAKE2b (./pages-1.img) = {DIGEST}\nBLAKE2b (./core-7.img) = {'b' * 128}\n"
    m = Manifest.parse(text)
    assert m.digests == (("./pages-1.img", DIGEST), ("./core-7.img", "b" * 128))
    assert Manifest.parse("\n".join(m.lines())) == m
    assert len(Manifest.parse("")) == 0


@pytest.mark.parametrize(
    "line",
    [
        f"SHA256 (./x.img) = {DIGEST}",  # another algorithm
        f"BLAKE2b (/abs/x.img) = {DIGEST}",  # not relative to the image dir
        f"BLAKE2b (./../x.img) = {DIGEST}",  # outside it
        "BLAKE2b (./x.img) = abc",  # a short digest
        f"\\BLAKE2b (./x\\ny.img) = {DIGEST}",  # an escaped (odd) name
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
    return Manifest.parse(r.stdout)


def test_record_then_verify(images: Path) -> None:
    m = record(images)
    assert [p for p, _ in m.digests] == ["./core-7.img", "./pages-1.img"]  # files, no log
    assert not (images / "final" / manifest.FILE).exists()  # collected and removed
    # Made root-only on the way: CRIU writes its images 0644.
    assert all(p.stat().st_mode & 0o077 == 0 for p in images.rglob("*") if not p.is_symlink())
    r = sh(manifest.verify_argv(str(images / "final"), m, str(images)))
    assert r.returncode == 0, r.stderr


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
    r = sh(manifest.verify_argv(str(images / "final"), m, str(images)))
    assert r.returncode != 0
    assert "pages-1.img" in r.stderr, r.stderr
    assert "core-7.img: OK" not in r.stderr  # only what is wrong is shown


def test_no_files_is_an_empty_manifest(tmp_path: Path) -> None:
    assert sh(manifest.start_argv(str(tmp_path), str(tmp_path))).returncode == 0
    r = sh(manifest.collect_argv(str(tmp_path), 30))
    assert r.returncode == 0 and Manifest.parse(r.stdout) == Manifest()
    assert sh(manifest.verify_argv(str(tmp_path), Manifest(), str(tmp_path))).returncode == 0


def test_rounds_and_final_are_checked_from_the_root(images: Path) -> None:
    """Pre-copy: each round hashed in its own dir, the final dump in `final`; the destination
    checks them all from the image root."""
    root = str(images)
    assert sh(manifest.start_argv(str(images / "1"), root)).returncode == 0
    round1 = Manifest.parse(sh(manifest.collect_argv(str(images / "1"), 30)).stdout).under("1")
    both = round1.merged(record(images).under("final"))
    assert [p for p, _ in both.digests] == ["./1/pages-1.img", "./final/core-7.img",
                                            "./final/pages-1.img"]  # fmt: skip
    assert sh(manifest.verify_argv(root, both, root)).returncode == 0
    (images / "1" / "pages-1.img").write_bytes(b"a round changed after it was sent")
    r = sh(manifest.verify_argv(root, both, root))
    assert r.returncode != 0 and "./1/pages-1.img: FAILED" in r.stderr, r.stderr
