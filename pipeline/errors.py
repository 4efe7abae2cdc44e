"""Exceptions shared by every stage.

``UsageError`` is a mistake the user can fix (bad flag, missing input, incompatible OUTPUT):
the CLI prints its message on one line and exits 2.  ``ItemError`` is a per-image failure: it
becomes one row of ``errors/`` (``stage``, ``error_type``, ``message``) and the job goes on.
"""

from __future__ import annotations

STAGES = ("list", "read", "decode", "model", "write")


class UsageError(Exception):
    """A user-fixable problem; reported as one line, exit code 2."""


class WeightsError(UsageError):
    """Weights that cannot be found, downloaded, verified or loaded into the chosen arch."""


class JobFailed(Exception):
    """The job could not complete (exit 1); what is written stays valid and resumable."""


class ItemError(Exception):
    """One image failed at ``stage``; becomes an error row instead of stopping the job."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        super().__init__(f"{stage}: {error_type}: {message}")
        self.stage = stage
        self.error_type = error_type
        self.message = message[:500]
