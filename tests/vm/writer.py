"""A workload for pre-copy: SIZE MiB of memory, 1 MiB of it rewritten every 100 ms (within
its first HOT MiB: a hot working set, the rest is written once), and a count of ticks written
to STATE each tick. It checks its own memory as it goes (one chunk a tick, over all of it,
against the value it last wrote there) and writes CORRUPT and exits on a mismatch.

usage: writer.py STATE SIZE_MIB HOT_MIB
"""

import os
import sys
import time

MIB = 1 << 20


def main() -> None:
    state, size, hot = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    buf = bytearray(b"\x01") * (size * MIB)  # every page touched: all of it is resident
    expect = [1] * size
    tick = 0
    while True:
        tick += 1
        chunk = (tick * 7) % hot  # walk the hot set (7 is prime to any size but 7's multiples)
        value = tick % 251 + 2
        buf[chunk * MIB : (chunk + 1) * MIB] = bytes([value]) * MIB
        expect[chunk] = value
        probe = tick % size
        at = probe * MIB
        if buf[at] != expect[probe] or buf[at + MIB - 1] != expect[probe]:
            _write(state, f"CORRUPT chunk {probe} at tick {tick}")
            sys.exit(1)
        _write(state, str(tick))
        time.sleep(0.1)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
