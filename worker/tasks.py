"""The function RQ runs for a dispatch. It executes inside the worker daemon's process
(SimpleWorker), hands the launch to the daemon, and returns as soon as the job started."""

from __future__ import annotations

import logging

from worker.daemon import WorkerDaemon

log = logging.getLogger("gpulab.worker")

CURRENT: WorkerDaemon | None = None  # set by worker.main before RQ starts taking jobs


def launch(job_id: int, attempt: int) -> str:
    if CURRENT is None:
        raise RuntimeError("gpulab launch ran outside a gpulab worker daemon")
    return CURRENT.launch(int(job_id), int(attempt))


def launch_many(launches: list[list[int]]) -> str:
    """Several launches in one RQ job (scheduler/dispatch.py): each is checked and started
    exactly as `launch` would; one that cannot start does not keep the others from it."""
    if CURRENT is None:
        raise RuntimeError("gpulab launch ran outside a gpulab worker daemon")
    daemon, results = CURRENT, []
    for job_id, attempt in launches:
        try:
            results.append(daemon.launch(int(job_id), int(attempt)))
        except Exception as exc:  # this one stays ASSIGNED: its lease lapses and it waits again
            log.exception("worker: launch of job %s attempt %s failed", job_id, attempt)
            results.append(f"failed: job {job_id}: {exc}")
    return "; ".join(results)
