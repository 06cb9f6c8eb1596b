"""CRIU's image framing and the stats-dump message, against a file a real `criu dump` wrote."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from orchestrator.criu import images

# Written by CRIU 4.2.1 on this project's machine: `criu dump` of a Python process holding
# 4 MiB; its pages-1.img was 11292672 bytes = 2757 pages, which is pages_written below.
FIXTURE = Path(__file__).parent / "fixtures" / "stats-dump"


def test_real_stats_dump_decodes() -> None:
    s = images.dump_stats(FIXTURE.read_bytes())
    assert s.pages_written == 11292672 // 4096 == 2757
    assert s.pages_scanned == 2853 and s.pages_skipped_parent == 0 and s.pages_lazy == 0
    assert (s.freezing_time_us, s.frozen_time_us) == (249, 21368)
    assert (s.memdump_time_us, s.memwrite_time_us) == (13967, 12819)
    assert s.frozen_ms == pytest.approx(21.368)


def test_varint() -> None:
    assert images.varint(bytes([0x96, 0x01]), 0) == (150, 2)
    assert images.varint(bytes([0xFF] * 9 + [0x01]), 0) == (2**64 - 1, 10)
    with pytest.raises(images.ImageError):
        images.varint(bytes([0x80]), 0)


def _msg(*pairs: tuple[int, int]) -> bytes:
    out = b""
    for number, value in pairs:
        out += bytes([number << 3]) + _var(value)
    return out


def _var(v: int) -> bytes:
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def _image(entry: bytes) -> bytes:
    head = struct.pack("<II", images.IMG_SERVICE_MAGIC, images.STATS_MAGIC)
    return head + struct.pack("<I", len(entry)) + entry


def test_built_message_and_unknown_fields() -> None:
    dump = _msg((7, 300), (6, 65536), (2, 1500)) + bytes([12 << 3 | 5]) + b"\1\0\0\0"
    data = _image(bytes([1 << 3 | 2]) + _var(len(dump)) + dump)
    s = images.dump_stats(data)
    assert (s.pages_written, s.pages_skipped_parent, s.frozen_time_us) == (300, 65536, 1500)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", "not the expected CRIU image"),
        (struct.pack("<II", images.IMG_COMMON_MAGIC, 0x12345678), "not the expected"),
        (FIXTURE.read_bytes()[:-3], "cut short"),
        (FIXTURE.read_bytes()[:10], "cut short"),
        (_image(bytes([2 << 3 | 2, 0])), "no dump statistics"),
        (_image(bytes([1 << 3 | 2, 9, 0])), "past the end"),
        (_image(bytes([1 << 3 | 3])), "wire type 3"),
    ],
)
def test_bad_images_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(images.ImageError, match=error):
        images.dump_stats(data)


def test_restore_stats_from_a_real_restore() -> None:
    """stats-restore written by CRIU 4.2.1 restoring a `sleep` on this kernel."""
    s = images.restore_stats(
        (Path(__file__).parent / "fixtures" / "stats-restore.img").read_bytes()
    )
    assert s.restore_time_us == 1671 and s.pages_restored == 31


def test_a_dump_stats_is_not_a_restore_stats() -> None:
    with pytest.raises(images.ImageError, match="no restore statistics"):
        images.restore_stats(FIXTURE.read_bytes())
