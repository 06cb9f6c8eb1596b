"""One exception hierarchy: every failure the tool raises by design is a MigrationError.

Its subclasses say where it came from (config, a host, rsync, an image, the journal); the
runner and the CLI catch only MigrationError, and anything else is a bug (still rolled back).
"""

from __future__ import annotations


class MigrationError(Exception):
    """A step failed; `details` holds supporting lines (e.g. CRIU's errors from its log)."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class JournalError(MigrationError):
    """The controller's journal cannot be written (full or read-only disk), or a write would
    take a migration backwards."""
