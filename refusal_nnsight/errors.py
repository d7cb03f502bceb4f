"""User-facing errors: one line, a fix, exit code 2, no traceback.

Library code raises `UserError` for mistakes a user can fix (a bad name, a missing file, an
out-of-range layer). The CLI catches it, prints `error: <message>` and exits 2. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or environment, explained in one line with its fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line


class NonFiniteError(UserError):
    """NaN or inf activations at a stage boundary (the Gemma-2 failure of the reference code)."""


class NothingToDissect(UserError):
    """No harmful prompt is refused at baseline: the pipeline writes a valid, empty summary."""


class RunDirBusy(UserError):
    """Another run holds the run folder's lock: this one is refused, never interleaved."""
