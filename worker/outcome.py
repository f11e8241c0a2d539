"""How a job's process ended, turned into a final state and reason. Pure."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from jobs.states import JobState, Reason
from worker.training.status import OOM_EXIT_CODE  # the loop's exit code for a CUDA OOM

OOM_MARKERS = (
    b"CUDA out of memory",
    b"torch.OutOfMemoryError",
    b"torch.cuda.OutOfMemoryError",
    b"CUDA_ERROR_OUT_OF_MEMORY",
)


@dataclass(frozen=True)
class Outcome:
    state: JobState
    reason: Reason
    detail: str
    exit_code: int | None


def classify(
    returncode: int,
    *,
    cancelled: bool,
    timed_out: bool,
    lease_lost: bool,
    status: dict[str, Any] | None,
    log_tail: bytes,
) -> Outcome:
    exit_code = returncode if returncode >= 0 else None
    signame = _signal_name(-returncode) if returncode < 0 else ""
    how = f"exit code {returncode}" if returncode >= 0 else f"killed by {signame}"
    if cancelled:
        return Outcome(JobState.CANCELLED, Reason.CANCELLED, how, exit_code)
    if timed_out:
        return Outcome(JobState.FAILED, Reason.TIMEOUT, f"time limit reached; {how}", exit_code)
    if returncode == 0:  # it finished on its own, even if its lease lapsed meanwhile
        return Outcome(JobState.COMPLETED, Reason.NONE, "", 0)
    if lease_lost:
        return Outcome(JobState.FAILED, Reason.NODE_LOST, f"lease lost; stopped ({how})", exit_code)
    # The status file is the job's own writing: only a real `true` says OOM, not any truthy value.
    said_oom = status is not None and status.get("oom") is True
    oom = returncode == OOM_EXIT_CODE or said_oom or any(m in log_tail for m in OOM_MARKERS)
    if oom:
        return Outcome(JobState.FAILED, Reason.OOM, f"CUDA out of memory ({how})", exit_code)
    if returncode < 0:
        return Outcome(JobState.FAILED, Reason.SIGNAL, how, None)
    return Outcome(JobState.FAILED, Reason.EXIT_CODE, how, exit_code)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
