"""Read CRIU's images: the framing (magic words, then 4-byte little-endian size + protobuf
message) and a minimal protobuf decoder, enough for the stats-dump image."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from orchestrator.errors import MigrationError

STATS_DUMP = "stats-dump"  # written by every dump and pre-dump into its images dir

# criu/include/magic.h
IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306


class ImageError(MigrationError, ValueError):
    """Not a CRIU image of the expected kind, or cut short."""


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode one base-128 varint at pos; (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ImageError("varint runs past the end of the message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ImageError("varint longer than 10 bytes")


def fields(msg: bytes) -> dict[int, int | bytes]:
    """A protobuf message's fields by number (the last value wins, as protobuf says).
    Varints and fixed-width numbers become ints; length-delimited fields stay bytes."""
    out: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(msg):
        key, pos = varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], pos = varint(msg, pos)
        elif wire == 1:
            out[number] = _fixed(msg, pos, 8, "<Q")
            pos += 8
        elif wire == 5:
            out[number] = _fixed(msg, pos, 4, "<I")
            pos += 4
        elif wire == 2:
            size, pos = varint(msg, pos)
            if pos + size > len(msg):
                raise ImageError(f"field {number} runs past the end of the message")
            out[number] = msg[pos : pos + size]
            pos += size
        else:
            raise ImageError(f"field {number}: unsupported wire type {wire}")
    return out


def _fixed(msg: bytes, pos: int, width: int, fmt: str) -> int:
    if pos + width > len(msg):
        raise ImageError("fixed-width field runs past the end of the message")
    value: int = struct.unpack_from(fmt, msg, pos)[0]
    return value


def entries(data: bytes, magic: int) -> list[bytes]:
    """The messages of an image whose magic is `magic` (after the common or service word)."""
    words = [struct.unpack_from("<I", data, i)[0] for i in range(0, min(len(data), 8) - 3, 4)]
    if words[:1] == [magic]:  # inventory-style: its own magic only
        pos = 4
    elif (
        len(words) == 2 and words[0] in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC) and words[1] == magic
    ):
        pos = 8
    else:
        seen = " ".join(f"{w:#010x}" for w in words) or "nothing"
        raise ImageError(f"not the expected CRIU image (magic {magic:#010x}; found {seen})")
    out = []
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageError("image cut short in an entry's size")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ImageError("image cut short in an entry")
        out.append(data[pos : pos + size])
        pos += size
    return out


@dataclass(frozen=True)
class DumpStats:
    """CRIU's dump_stats_entry (images/stats.proto); times in microseconds."""

    freezing_time_us: int = 0
    frozen_time_us: int = 0
    memdump_time_us: int = 0
    memwrite_time_us: int = 0
    pages_scanned: int = 0
    pages_skipped_parent: int = 0
    pages_written: int = 0
    irmap_resolve_us: int = 0
    pages_lazy: int = 0

    @property
    def frozen_ms(self) -> float:
        return self.frozen_time_us / 1000


# dump_stats_entry field numbers -> DumpStats attributes
_DUMP_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    8: "irmap_resolve_us",
    9: "pages_lazy",
}


def dump_stats(data: bytes) -> DumpStats:
    """Decode a stats-dump image (stats_entry { dump_stats_entry dump = 1; ... })."""
    return DumpStats(**_stats(data, 1, _DUMP_FIELDS, "stats-dump", "dump statistics (a restore's"))


def _stats(data: bytes, entry: int, names: dict[int, str], image: str, what: str) -> dict[str, int]:
    """The numbers of one part (`entry`) of a stats image's stats_entry, by field name."""
    msgs = entries(data, STATS_MAGIC)
    if len(msgs) != 1:
        raise ImageError(f"{image} holds {len(msgs)} entries, expected 1")
    part = fields(msgs[0]).get(entry)
    if not isinstance(part, bytes):
        raise ImageError(f"{image} holds no {what} stats?)")
    return {names[n]: v for n, v in fields(part).items() if n in names and isinstance(v, int)}


STATS_RESTORE = "stats-restore"  # written by a restore into its images dir


@dataclass(frozen=True)
class RestoreStats:
    """CRIU's restore_stats_entry (images/stats.proto); times in microseconds."""

    pages_compared: int = 0
    pages_skipped_cow: int = 0
    forking_time_us: int = 0
    restore_time_us: int = 0
    pages_restored: int = 0


_RESTORE_FIELDS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time_us",
                   4: "restore_time_us", 5: "pages_restored"}  # fmt: skip


def restore_stats(data: bytes) -> RestoreStats:
    """Decode a stats-restore image (stats_entry { ...; restore_stats_entry restore = 2; })."""
    fields_ = _stats(data, 2, _RESTORE_FIELDS, "stats-restore", "restore statistics (a dump's")
    return RestoreStats(**fields_)
