"""JobRecord.updated: the scheduler's fast copy must be exactly what dataclasses.replace makes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.record import GpuAssignment, JobRecord
from jobs.spec import JobSpec
from jobs.states import JobState


def test_updated_is_replace_and_leaves_the_original_alone() -> None:
    record = JobRecord(id=7, spec=JobSpec(command=("true",), cwd="/"), state=JobState.PENDING, user="a", uid=1000)
    changes = {"state": JobState.RUNNING, "gpus": (GpuAssignment(0, "GPU-x"),), "est_start_at": 5.0}
    assert record.updated(**changes) == replace(record, **changes)
    assert record.state is JobState.PENDING and record.gpus == ()
    with pytest.raises(TypeError, match="no field 'nope'"):
        record.updated(nope=1)
