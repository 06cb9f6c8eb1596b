"""A workload with a big, busy memory: LOG SIZE_MIB MARKER.

Fills SIZE_MIB of memory (every page stamped with its index and version, some with MARKER),
then every TICK rewrites a few random pages, checks a few others still hold what it wrote
(memory that came back wrong after a migration shows as CORRUPT and exit 3), and appends
"tick wallclock" to LOG. Its largest gap between ticks is the freeze it felt.
"""

import random
import struct
import sys
import time

TICK = 0.005
PAGE = 4096
REWRITE = 64  # pages rewritten per tick (~50 MiB/s at 5 ms ticks)
CHECK = 16  # pages checked per tick

log_path, size_mib, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
pages = size_mib * 1024 * 1024 // PAGE
mem = bytearray(pages * PAGE)
version = [0] * pages
filler = bytes(range(256)) * (PAGE // 256)


def stamp(i: int) -> None:
    head = struct.pack("<QQ", i, version[i])
    body = marker if i % 64 == 0 else b""
    mem[i * PAGE : (i + 1) * PAGE] = (head + body + filler)[:PAGE]


for i in range(pages):
    stamp(i)

rng = random.Random(1)
tick = 0
with open(log_path, "a", buffering=1) as log:
    while True:
        tick += 1
        for i in rng.sample(range(pages), REWRITE):
            version[i] += 1
            stamp(i)
        for i in rng.sample(range(pages), CHECK):
            if struct.unpack_from("<QQ", mem, i * PAGE) != (i, version[i]):
                log.write(f"CORRUPT page {i} at tick {tick}\n")
                sys.exit(3)
        log.write(f"{tick} {time.time():.6f}\n")
        time.sleep(TICK)
