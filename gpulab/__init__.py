"""gpulab's Python API: submit, watch and control jobs from Python or a notebook.

    import gpulab
    job = gpulab.submit(["python", "train.py"], mem="8GiB")
    job.wait()
    print(job.state, job.exit_code, job.logs())

See README.md, "Python API". The daemons never import this package.
"""

from __future__ import annotations

from gpulab.client import Client, Job, TrainingResult, default_client, submit, train
from gpulab.errors import (
    GpulabError,
    InvalidRequest,
    JobFailed,
    JobNotFound,
    PermissionDenied,
    Refused,
    SchedulerUnreachable,
    WaitTimeout,
)

__all__ = [
    "Client",
    "GpulabError",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobNotFound",
    "PermissionDenied",
    "Refused",
    "SchedulerUnreachable",
    "TrainingResult",
    "WaitTimeout",
    "default_client",
    "submit",
    "train",
]
