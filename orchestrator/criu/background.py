"""CRIU processes that outlive the command that starts them (post-copy's lazy dump on the
source, the lazy-pages daemon on the destination).

Each is started detached in one round trip that returns when CRIU reports ready on its
`--status-fd`, never after a sleep; its exit code lands in NAME.rc in the images dir, so that
completion can be awaited later, from any connection, even by `migrate recover`. The host's
agent does this itself (transport/agent_main.py: no shell inside the freeze); a host without
one runs the sh wrapper below (a FIFO as the status fd), which keeps the same contract.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orchestrator.criu.logs import raise_on_failure
from orchestrator.criu.pagechannel import Call
from orchestrator.errors import MigrationError
from orchestrator.transport.ssh import Host

DUMP = "dump"  # post-copy: the source's lazy dump, serving pages
LAZY_PAGES = "lazy-pages"  # post-copy: the destination's daemon, pulling them

# $1 images dir, $2 name, $3 seconds to wait for readiness, then CRIU's argv.
# Prints "ready", or "exited RC" when CRIU ended before it was ready.
_START = r"""
umask 077
dir=$1 name=$2 wait=$3; shift 3
fifo=$dir/$name.ready rc=$dir/$name.rc
rm -f -- "$fifo" "$rc" "$rc.tmp"
mkfifo -m 600 -- "$fifo" || exit 1
(
  "$@" --status-fd 3 3>"$fifo" </dev/null >/dev/null 2>"$dir/$name.err"
  echo $? >"$rc.tmp" && mv -f -- "$rc.tmp" "$rc"
) </dev/null >/dev/null 2>&1 &
got=$(timeout "$wait" head -c 1 -- "$fifo" | od -An -c)
rm -f -- "$fifo"
if [ -n "$got" ]; then echo ready; exit 0; fi
i=0
while [ ! -e "$rc" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
echo "exited $(cat -- "$rc" 2>/dev/null || echo unknown)"
"""

# $1 images dir, $2 name, $3 seconds: prints the exit code once NAME.rc exists, else "running".
_WAIT = r"""
rc=$1/$2.rc end=$(( $(date +%s) + $3 ))
while [ ! -e "$rc" ]; do
  [ "$(date +%s)" -ge "$end" ] && { echo running; exit 0; }
  sleep 0.1
done
cat -- "$rc"
"""


@dataclass(frozen=True)
class Started:
    ready: bool
    exit_code: str = ""  # when not ready: CRIU's exit code ("unknown" if it never said)


def start_argv(images_dir: str, name: str, wait: float, argv: list[str]) -> list[str]:
    """Run on a host: start argv (a CRIU command) detached; return once it is ready."""
    return ["sh", "-c", _START, "sh", images_dir, name, str(int(max(1, wait))), *argv]


def parse_start(stdout: str) -> Started:
    last = stdout.strip().rsplit("\n", 1)[-1] if stdout.strip() else ""
    if last == "ready":
        return Started(True)
    if last.startswith("exited "):
        return Started(False, last.split(" ", 1)[1])
    raise MigrationError(f"unexpected output starting a background CRIU: {last or 'nothing'}")


def wait_argv(images_dir: str, name: str, seconds: float) -> list[str]:
    """Run on a host: wait up to `seconds` for NAME to end; prints its exit code or `running`."""
    return ["sh", "-c", _WAIT, "sh", images_dir, name, str(int(max(0, seconds)))]


def parse_wait(stdout: str) -> int | None:
    """The exit code, or None while it still runs."""
    text = stdout.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def start(host: Host, images_dir: str, name: str, call: Call, log: str, what: str) -> None:
    """Start call's argv detached as NAME on host (with the sockets it is handed); raise with
    CRIU's own error lines if it ends before it is ready."""
    wait = host.policy.command_timeout
    if host.agent is not None:
        r = host.run(call.argv, timeout=wait, sockets=call.sockets, handed=call.handed,
                     detach=(images_dir, name))  # fmt: skip
    else:
        r = host.run(start_argv(images_dir, name, wait, call.argv), sockets=call.sockets,
                     handed=call.handed)  # fmt: skip
    if r.dry:
        return
    started = parse_start(r.stdout) if r.ok else Started(False, "")
    if not started.ready:
        code = int(started.exit_code) if started.exit_code.isdigit() else r.exit_code or 1
        raise_on_failure(host, dataclasses.replace(r, exit_code=code), images_dir, log, what)


def wait(host: Host, images_dir: str, name: str, seconds: float) -> int | None:
    """NAME's exit code once it has ended (waiting up to seconds), else None."""
    slice_ = max(1.0, host.policy.command_timeout - 5)
    deadline = seconds
    while True:
        step = min(deadline, slice_)
        code = parse_wait(host.run(wait_argv(images_dir, name, step), mutates=False).stdout)
        deadline -= step
        if code is not None or deadline <= 0:
            return code
