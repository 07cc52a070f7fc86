"""The job's failure kinds, which main.py maps to exit codes (DESIGN.md: 0 done, 1 retryable, 2 permanent).

Any other exception is retryable (a crash, a preemption, a service outage): exit 1.
"""


class PermanentError(Exception):
    """A retry cannot fix it (invalid request, missing dataset, access denied): exit 2."""


class Cancelled(Exception):
    """Someone set `cancel_requested: true` on the job document: the job ends `failed`, exit 0."""


class Interrupted(Exception):
    """Stopped before the task's end (SIGTERM, the task timeout ahead) with a checkpoint saved: exit 1,
    and the next attempt resumes."""


class CheckFailed(PermanentError):
    """An exported artifact disagrees with the trained model in the program that loads it: that artifact is
    not uploaded, the others are (exporting/export.py); `entry` is its verification record, `passed: false`."""

    def __init__(self, message: str, entry: dict | None = None):
        super().__init__(message)
        self.entry = entry or {}


class RequestError(PermanentError, ValueError):
    """The request (or the job's environment) is invalid: permanent, exit code 2."""
