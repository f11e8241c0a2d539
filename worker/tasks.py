"""The function RQ runs for a dispatch. It executes inside the worker daemon's process
(SimpleWorker), hands the launch to the daemon, and returns as soon as the job started."""

from __future__ import annotations

from worker.daemon import WorkerDaemon

CURRENT: WorkerDaemon | None = None  # set by worker.main before RQ starts taking jobs


def launch(job_id: int, attempt: int) -> str:
    if CURRENT is None:
        raise RuntimeError("gpulab launch ran outside a gpulab worker daemon")
    return CURRENT.launch(int(job_id), int(attempt))


def launch_many(launches: list[list[int]]) -> str:
    """Several launches in one RQ job (scheduler/dispatch.py), started as one batch
    (WorkerDaemon.launch_many): each is checked and guarded exactly as `launch` would; one
    that cannot start does not keep the others from it."""
    if CURRENT is None:
        raise RuntimeError("gpulab launch ran outside a gpulab worker daemon")
    return "; ".join(CURRENT.launch_many([(int(job_id), int(attempt)) for job_id, attempt in launches]))
