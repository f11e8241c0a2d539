"""The Python API's exceptions: one class per way a request can go wrong, so callers can
catch what they can handle (`except gpulab.JobNotFound`) and let the rest propagate."""

from __future__ import annotations


class GpulabError(Exception):
    """Base of every error the Python API raises. `str()` is the one line the CLI would print."""


class SchedulerUnreachable(GpulabError):
    """The scheduler's socket is missing, refuses connections or does not answer."""


class InvalidRequest(GpulabError, ValueError):
    """A request refused as given: a bad option, an absurd size, an unknown field, a request
    no node could ever satisfy (`Infeasible`) (HTTP 400/413)."""


class JobNotFound(GpulabError, LookupError):
    """No job with this id (HTTP 404)."""


class PermissionDenied(GpulabError, PermissionError):
    """Not the job's owner nor an admin (HTTP 403)."""


class Refused(GpulabError):
    """The scheduler refused a valid request now: a per-user limit (HTTP 429) or a conflicting
    state (409)."""


class WaitTimeout(GpulabError, TimeoutError):
    """`Job.wait(timeout)` ran out before the job ended."""


class JobFailed(GpulabError):
    """Raised by `Job.wait(check=True)` when a job ends other than COMPLETED."""

    def __init__(self, job_id: int, state: str, reason: str, exit_code: int | None) -> None:
        ending = f"{state}" + (f" ({reason})" if reason else "") + (f", exit code {exit_code}" if exit_code else "")
        super().__init__(f"job {job_id} ended {ending}")
        self.job_id = job_id
        self.state = state
        self.reason = reason
        self.exit_code = exit_code


def from_status(status: int, message: str) -> GpulabError:
    """The typed exception for an API error answer."""
    if status == 404:
        return JobNotFound(message)
    if status == 403:
        return PermissionDenied(message)
    if status in (400, 413):
        return InvalidRequest(message)
    if status in (409, 429):
        return Refused(message)
    return GpulabError(message)
