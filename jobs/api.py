"""The scheduler API's routes and shapes, shared by the server (scheduler/) and the client.

Plain JSON over HTTP on a Unix socket, so `curl --unix-socket <sock> http://x/v1/jobs` works.
"""

from __future__ import annotations

API_PREFIX = "/v1"
MAX_BODY_BYTES = 1024 * 1024
MAX_WAIT_S = 300.0


class ApiError(Exception):
    """An error the API answers with: HTTP status plus one line for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def jobs_path() -> str:
    return f"{API_PREFIX}/jobs"


def job_path(job_id: int, action: str = "") -> str:
    return f"{API_PREFIX}/jobs/{job_id}" + (f"/{action}" if action else "")


def gpus_path() -> str:
    return f"{API_PREFIX}/gpus"


JOB_ACTIONS = ("cancel", "hold", "release")
MAX_BULK_IDS = 100_000  # jobs one bulk cancel/hold/release may name (after arrays are expanded)


def bulk_path(action: str) -> str:
    """POST {"ids": [...], "arrays": [...]}: one action on many jobs in one round trip."""
    return f"{API_PREFIX}/jobs/{action}"


def node_path(name: str, action: str) -> str:
    return f"{API_PREFIX}/nodes/{name}/{action}"
