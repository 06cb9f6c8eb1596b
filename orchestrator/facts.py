"""Host facts: what pre-flight needs to know about a host, asked in one round trip.

Three parts, kept apart so that the parsing is tested from recorded outputs
(tests/unit/facts/*.json) without a host:

- `argv(criu, workdir, features, commands)`: ONE `sh -c SCRIPT sh ARGS...` command. Every value
  is a positional argument, never pasted into the script. It prints each fact in its own
  section, delimited by marker lines::

      @@migrate-fact NAME
      ...what the command printed (stdout and stderr)...
      @@migrate-fact-end NAME EXIT_CODE

  and `@@migrate-facts-done` last, so that a truncated output is told from a complete one.
- `parse(host_name, stdout, exit_code)`: pure; the text above into a `HostFacts`.
- `gather(host, features, commands)`: runs `argv` on a host (read-only) and parses it; a host
  that cannot be reached gives a `HostFacts` with `error` set.

Sections (in this order): `criu-version` (`criu --version`), `criu-check` (`criu check`),
`rsync` (`rsync --version`, first line), `df` (`df -Pk` of the workdir, or of its nearest
existing parent, last line), `workdir` (`NAME UID GID MODE` of the workdir's `images` and
`locks` and of the workdir and each ancestor, named by depth 0, 1, ..., those that exist),
`pipe-max-size` (`/proc/sys/fs/pipe-max-size`), `features` (one
line `NAME RC` per `criu check --feature NAME`), `commands` (one line `NAME RC` per
`command -v NAME`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.criu.commands import parse_version
from orchestrator.criu.logs import error_lines
from orchestrator.transport.ssh import Host, HostError

# The markers, as SCRIPT prints them.
BEGIN = "@@migrate-fact"
END = "@@migrate-fact-end"
DONE = "@@migrate-facts-done"

# $1 criu binary, $2 workdir, $3 how many feature names follow, then the features, then the
# commands. Each marker starts with a newline so that it begins a line even after output
# without a final newline; `$?` is read when the marker's arguments are expanded, i.e. right
# after the command it reports.
SCRIPT = r"""criu=$1 workdir=$2 n=$3
shift 3
begin() { printf '\n@@migrate-fact %s\n' "$1"; }
end() { printf '\n@@migrate-fact-end %s %s\n' "$1" "$2"; }
begin criu-version; "$criu" --version 2>&1; end criu-version $?
begin criu-check; "$criu" check 2>&1; end criu-check $?
begin rsync; out=$(rsync --version 2>&1); rc=$?; printf '%s\n' "$out" | head -n 1; end rsync $rc
begin df; d=$workdir
while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done
out=$(df -Pk -- "$d" 2>&1); rc=$?; printf '%s\n' "$out" | tail -n 1; end df $rc
begin workdir; d=$workdir
for s in images locks; do [ -e "$d/$s" ] && stat -L -c "$s %u %g %a" -- "$d/$s"; done
i=0
while :; do
  [ -e "$d" ] && stat -L -c "$i %u %g %a" -- "$d"; [ "$d" = / ] && break
  d=$(dirname -- "$d"); i=$((i + 1))
done 2>&1; end workdir 0
begin pipe-max-size; cat /proc/sys/fs/pipe-max-size 2>&1; end pipe-max-size $?
begin features; i=0
while [ "$i" -lt "$n" ]; do
  "$criu" check --feature "$1" >/dev/null 2>&1; printf '%s %s\n' "$1" "$?"; shift; i=$((i + 1))
done
end features 0
begin commands
for c; do command -v "$c" >/dev/null 2>&1; printf '%s %s\n' "$c" "$?"; done
end commands 0
printf '\n@@migrate-facts-done\n'
"""

_BEGIN = re.compile(rf"^{re.escape(BEGIN)} (\S+)$")
_END = re.compile(rf"^{re.escape(END)} (\S+) (\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class HostFacts:
    """What one host told about itself (or why it could not).

    `criu_version` is None when `criu --version` did not run or said no version; `criu_ok` is
    True only when `criu check` passed as well; `criu_error` is CRIU's most telling line when
    either failed. `free_kb` (at the workdir, or its nearest existing parent) and `pipe_max`
    (`fs.pipe-max-size`) are 0 when unknown. `features` are the asked CRIU features that
    `criu check --feature` confirmed (asked even when `criu check` failed), `commands` the
    asked programs found on PATH. `error`
    is set when the host could not be asked or its answer was incomplete."""

    host: str
    criu_version: tuple[int, int, int] | None = None
    criu_ok: bool = False
    criu_error: str = ""
    rsync: bool = False
    free_kb: int = 0
    features: tuple[str, ...] = ()
    pipe_max: int = 0
    commands: tuple[str, ...] = ()
    error: str = ""
    workdir: str = ""
    #: (name, uid, gid, mode) of what exists of the workdir: `images`, `locks`, and the
    #: workdir and its ancestors by depth ("0" the workdir); empty when unknown.
    workdir_modes: tuple[tuple[str, int, int, int], ...] = ()

    @property
    def ok(self) -> bool:
        """Usable as either end of a migration: reachable, CRIU usable, rsync present."""
        return not self.error and self.criu_ok and self.rsync and self.criu_version is not None

    def problems(self) -> list[str]:
        """Why not `ok`, one line each (empty when ok)."""
        if self.error:
            return [self.error]
        out = []
        if self.criu_version is None:
            out.append(f"{self.host}: criu not found or unusable ({self.criu_error})")
        elif not self.criu_ok:
            out.append(f"{self.host}: `criu check` failed: {self.criu_error}")
        if not self.rsync:
            out.append(f"{self.host}: rsync is not installed")
        unsafe = self.unsafe_workdir()
        if unsafe:
            out.append(
                f"{self.host}: workdir {self.workdir}: {unsafe}: another user could read or swap "
                "the images (process memory) there; make it root's and writable by root alone"
            )
        return out

    def unsafe_workdir(self) -> str | None:
        """What lets a user other than root into the workdir (None: nothing known to): a part
        owned by another user, or writable by another user: the workdir, its `images` and
        `locks`, or (when the workdir is yet to be made) the nearest part that exists, even if
        sticky (e.g. /tmp: another user could make the workdir first); an ancestor above it,
        unless sticky (/tmp holding a workdir made by root)."""
        depths = [int(n) for n, *_ in self.workdir_modes if n.isdigit()]
        nearest = str(min(depths)) if depths else None
        for name, uid, gid, mode in self.workdir_modes:
            path = self._part(name)
            if uid != 0:
                return f"{path} is owned by uid {uid}, not root"
            others = mode & 0o002 or (mode & 0o020 and gid != 0)
            if others and (not mode & 0o1000 or name in ("images", "locks", nearest)):
                who = "all" if mode & 0o002 else f"group {gid}"
                return f"{path} is writable by {who} (mode {mode:o})"
        return None

    def _part(self, name: str) -> str:
        """The path of a `workdir_modes` name."""
        if not name.isdigit():
            return posixpath.join(self.workdir, name)
        path = self.workdir
        for _ in range(int(name)):
            path = posixpath.dirname(path.rstrip("/") or "/")
        return path

    def lacks_features(self, wanted: Sequence[str]) -> list[str]:
        """Of the CRIU features wanted, those this host does not have (in the order asked)."""
        return [f for f in wanted if f not in self.features]

    def lacks_commands(self, wanted: Sequence[str]) -> list[str]:
        """Of the programs wanted, those this host does not have (in the order asked)."""
        return [c for c in wanted if c not in self.commands]


def argv(criu: str, workdir: str, features: Sequence[str], commands: Sequence[str]) -> list[str]:
    """The one command that prints every fact (see the module's docstring)."""
    for name in (*features, *commands):
        if not _NAME.match(name):  # one token per line in the output: no blanks, no newlines
            raise ValueError(f"not a feature or command name: {name!r}")
    return ["sh", "-c", SCRIPT, "sh", criu, workdir, str(len(features)), *features, *commands]


@dataclass
class _Section:
    lines: list[str]
    rc: int | None = None  # None: its end marker never came

    @property
    def text(self) -> str:
        return "\n".join(self.lines).strip("\n")

    @property
    def ok(self) -> bool:
        return self.rc == 0


def _sections(stdout: str) -> tuple[dict[str, _Section], bool]:
    """The sections of the output by name, and whether the output was complete. Lines
    outside any section (a shell's noise) are ignored."""
    found: dict[str, _Section] = {}
    current: _Section | None = None
    done = False
    for line in stdout.splitlines():
        if m := _END.match(line):
            sec = found.get(m.group(1))
            if sec is not None and sec is current:
                sec.rc = int(m.group(2))
            current = None
        elif m := _BEGIN.match(line):
            current = found[m.group(1)] = _Section([])
        elif line == DONE:
            done, current = True, None
        elif current is not None:
            current.lines.append(line)
    return found, done


def _last_line(text: str, rc: int | None) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else (f"exit code {rc}" if rc is not None else "no output")


def _named(sec: _Section | None) -> tuple[str, ...]:
    """Names whose line says exit code 0, from a complete `NAME RC` section (a section cut
    short counts for nothing)."""
    if sec is None or sec.rc is None:
        return ()
    out = []
    for line in sec.lines:
        parts = line.split()
        if len(parts) == 2 and parts[1] == "0":
            out.append(parts[0])
    return tuple(out)


def _modes(sec: _Section | None) -> tuple[tuple[str, int, int, int], ...]:
    """`NAME UID GID MODE` lines (mode in octal); other lines (a stat error) are left out."""
    if sec is None or sec.rc is None:
        return ()
    out = []
    for line in sec.lines:
        parts = line.split()
        if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
            try:
                out.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3], 8)))
            except ValueError:
                continue
    return tuple(out)


def parse(
    host_name: str, stdout: str, exit_code: int, stderr: str = "", workdir: str = ""
) -> HostFacts:
    """The facts in `argv`'s output (pure). An incomplete output (no final marker, or a
    non-zero exit) still yields what it holds, with `error` saying so (quoting the last line
    of `stderr`, if any, else of `stdout`)."""
    secs, done = _sections(stdout)
    criu_version = None
    criu_ok = False
    criu_error = ""
    ver = secs.get("criu-version")
    if ver is not None and ver.rc is not None:
        criu_version = parse_version(ver.text)
        if criu_version is None or not ver.ok:
            criu_error = _last_line(ver.text, ver.rc)
    if criu_version is not None:
        chk = secs.get("criu-check")
        if chk is not None and chk.rc is not None:
            criu_ok = chk.ok
            if not chk.ok:
                lines = error_lines(chk.text)
                criu_error = lines[-1] if lines else _last_line(chk.text, chk.rc)
    rs = secs.get("rsync")
    free_kb = 0
    df = secs.get("df")
    if df is not None and df.ok:
        fields = df.text.split()
        if len(fields) > 3 and fields[3].isdigit():
            free_kb = int(fields[3])
    pipe = secs.get("pipe-max-size")
    pipe_max = int(pipe.text.strip()) if pipe and pipe.ok and pipe.text.strip().isdigit() else 0
    error = ""
    if not done or exit_code != 0:
        last = _last_line(stderr if stderr.strip() else stdout, None)
        error = (
            f"{host_name}: incomplete host facts (exit code {exit_code}; last line: {last[:200]})"
        )
    return HostFacts(
        host=host_name,
        criu_version=criu_version,
        criu_ok=criu_ok,
        criu_error=criu_error,
        rsync=rs is not None and rs.ok,
        free_kb=free_kb,
        features=_named(secs.get("features")),
        pipe_max=pipe_max,
        commands=_named(secs.get("commands")),
        error=error,
        workdir=workdir,
        workdir_modes=_modes(secs.get("workdir")),
    )


def gather(host: Host, features: Sequence[str] = (), commands: Sequence[str] = ()) -> HostFacts:
    """The facts of one host in one read-only round trip (connecting first if need be); a
    host that cannot be reached or asked gives `HostFacts(error=...)`."""
    try:
        host.connect()
        r = host.run(argv(host.config.criu, host.config.workdir, features, commands), mutates=False)
    except HostError as e:
        return HostFacts(host.name, error=str(e))
    return parse(host.name, r.stdout, r.exit_code, r.stderr, host.config.workdir)
