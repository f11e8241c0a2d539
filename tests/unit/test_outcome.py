from __future__ import annotations

import pytest

from jobs.states import JobState, Reason
from worker.outcome import OOM_EXIT_CODE, classify


def _classify(code: int, **kw: object) -> tuple[JobState, Reason, int | None]:
    args = {"cancelled": False, "timed_out": False, "lease_lost": False, "status": None, "log_tail": b""}
    args.update(kw)
    outcome = classify(code, **args)  # type: ignore[arg-type]
    return outcome.state, outcome.reason, outcome.exit_code


@pytest.mark.parametrize(
    ("code", "kw", "expected"),
    [
        (0, {}, (JobState.COMPLETED, Reason.NONE, 0)),
        (3, {}, (JobState.FAILED, Reason.EXIT_CODE, 3)),
        (-9, {}, (JobState.FAILED, Reason.SIGNAL, None)),
        (-15, {"cancelled": True}, (JobState.CANCELLED, Reason.CANCELLED, None)),
        (-15, {"timed_out": True}, (JobState.FAILED, Reason.TIMEOUT, None)),
        (143, {"timed_out": True}, (JobState.FAILED, Reason.TIMEOUT, 143)),
        (OOM_EXIT_CODE, {}, (JobState.FAILED, Reason.OOM, OOM_EXIT_CODE)),
        (
            1,
            {"log_tail": b"...torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"},
            (JobState.FAILED, Reason.OOM, 1),
        ),
        (1, {"status": {"oom": True}}, (JobState.FAILED, Reason.OOM, 1)),
        (-9, {"lease_lost": True}, (JobState.FAILED, Reason.NODE_LOST, None)),
        (0, {"cancelled": True}, (JobState.CANCELLED, Reason.CANCELLED, 0)),
        (0, {"lease_lost": True}, (JobState.COMPLETED, Reason.NONE, 0)),
    ],
)
def test_classify(code: int, kw: dict[str, object], expected: tuple[JobState, Reason, int | None]) -> None:
    assert _classify(code, **kw) == expected
