"""Errors a migration step raises: one line for the operator, plus CRIU's own lines if any."""

from __future__ import annotations


class MigrationError(Exception):
    """A step failed; `details` holds supporting lines (e.g. CRIU's errors from its log)."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []
