"""An HTTP client that fetches one file in a loop over keep-alive connections until argv[3]
exists; prints a JSON summary: requests, failures (with their errors), connections opened."""

import http.client
import json
import os
import sys
import time


def main() -> None:
    host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = None
    requests = failures = connections = 0
    errors: list[str] = []
    gap, last = 0.0, time.monotonic()
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=30)
                connections += 1
            conn.request("GET", "/file.txt")
            resp = conn.getresponse()
            body = resp.read()
            requests += 1
            if resp.status != 200 or not body.startswith(b"migrate"):
                failures += 1
                errors.append(f"status {resp.status}")
            now = time.monotonic()
            gap, last = max(gap, now - last), now
        except (OSError, http.client.HTTPException) as e:
            failures += 1
            errors.append(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(0.01)
    print(
        json.dumps(
            {
                "requests": requests,
                "failures": failures,
                "errors": errors[:5],
                "connections": connections,
                "max_gap_ms": round(gap * 1000),
            }
        )
    )


if __name__ == "__main__":
    main()
