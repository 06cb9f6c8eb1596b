"""A client that keeps ONE connection and sends a numbered line every 10 ms, checking each reply.

Runs until the file named by argv[3] exists; then writes a JSON summary to stdout: messages sent,
replies received, lost, duplicated and out-of-order replies, reconnects (always 0: it never
reconnects; a broken connection ends the run with an error), and the largest reply gap in ms.
"""

import json
import os
import socket
import sys
import time


def main() -> None:
    host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(30)
    local = sock.getsockname()
    reader = sock.makefile("rb")
    sent = received = dup = disorder = 0
    expect = 0
    seen: set[int] = set()
    last = time.monotonic()
    gap = 0.0
    error = None
    try:
        while not os.path.exists(stop):
            sock.sendall(f"{sent}\n".encode())
            sent += 1
            line = reader.readline()
            if not line:
                error = "connection closed by the server"
                break
            n = int(line)
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            received += 1
            if n in seen:
                dup += 1
            elif n != expect:
                disorder += 1
            seen.add(n)
            expect = n + 1
            time.sleep(0.01)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    print(
        json.dumps(
            {
                "sent": sent,
                "received": received,
                "lost": sent - received - (1 if error else 0),
                "duplicated": dup,
                "out_of_order": disorder,
                "max_gap_ms": round(gap * 1000),
                "local": f"{local[0]}:{local[1]}",
                "error": error,
            }
        )
    )


if __name__ == "__main__":
    main()
