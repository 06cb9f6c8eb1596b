"""A TCP client (the migrated workload): one connection to ADDRESS PORT (an echo server), a
line every tick and its echo back; the count of echoes to COUNT_FILE (a new file each time).
On any error on the connection it writes "broken" there and exits."""

import os
import socket
import sys
import time


def write(path: str, text: str) -> None:
    with open(f"{path}.tmp", "w") as f:
        f.write(text + "\n")
    os.rename(f"{path}.tmp", path)


def main() -> None:
    address, port, count_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = socket.create_connection((address, port))
    lines = conn.makefile("rb")
    n = 0
    while True:
        try:
            conn.sendall(b"%d\n" % n)
            if lines.readline() != b"%d\n" % n:
                raise OSError("no echo")
        except OSError:
            write(count_file, "broken")
            return
        n += 1
        write(count_file, str(n))
        time.sleep(0.05)


if __name__ == "__main__":
    main()
