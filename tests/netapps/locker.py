"""A workload holding a file lock (posix, flock or ofd) on PATH, from start to end: counts in
memory and writes the count to PATH.count every tick (a new file each time: none stays open)."""

import fcntl
import os
import struct
import sys
import time

F_OFD_GETLK, F_OFD_SETLK = 36, 37


def lock(fd: int, mode: str) -> None:
    if mode == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif mode == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # struct flock: type, whence, start, len, pid
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    lock(fd, mode)
    n = 0
    while True:
        n += 1
        tmp = f"{path}.count.tmp"
        with open(tmp, "w") as f:
            f.write(f"{n}\n")
        os.rename(tmp, f"{path}.count")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
