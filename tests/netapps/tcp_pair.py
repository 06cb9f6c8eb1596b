"""A plain process tree holding a TCP connection inside itself (client and server on loopback):
the client (the root, whose pid goes to COUNT.pid) sends a numbered line every 50 ms, checks the
echo and writes how many round trips it made to COUNT. With `stopped`, one more child stops
itself (SIGSTOP) at once: a task the workload stopped, not the tool. Usage: tcp_pair.py COUNT
[stopped]. Every process has COUNT in its arguments (the tests find copies by it)."""

import os
import signal
import socket
import sys
import time


def main() -> None:
    count = sys.argv[1]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    if os.fork() == 0:
        conn, _ = srv.accept()
        while data := conn.recv(64):
            conn.sendall(data)
        os._exit(0)
    if sys.argv[2:] == ["stopped"] and os.fork() == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        while True:  # woken: it sleeps on (state S, not T)
            time.sleep(1)
    client = socket.create_connection(srv.getsockname())
    reader = client.makefile("rb")
    with open(count + ".pid", "w") as f:
        f.write(str(os.getpid()))
    n = 0
    while True:
        client.sendall(f"{n}\n".encode())
        if int(reader.readline()) != n:
            raise SystemExit("wrong echo")
        n += 1
        with open(count, "w") as f:
            f.write(f"{n}\n")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
