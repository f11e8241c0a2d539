"""Break 3 (issue 13): `gpulab cancel` must stop everything the job started, including a
process that double-forked and called setsid (out of the job's process group and tree)."""

from __future__ import annotations

from jobs.states import JobState
from tests.chaos.invariants import check_invariants
from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import Stack


def test_cancel_kills_a_double_forked_setsid_child(stack: Stack, marker: Marker) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", *marker.job_args("--escape"))
    stack.wait_state(job, JobState.RUNNING)
    start = marker.wait_start(job, 1)
    (escaped,) = marker.escaped(job)
    assert pid_alive(escaped)

    assert stack.cli("cancel", str(job)).returncode == 0
    assert stack.wait_state(job, JobState.CANCELLED, JobState.COMPLETED, JobState.FAILED).state == JobState.CANCELLED
    assert not pid_alive(start.pid)
    assert not pid_alive(escaped), f"job {job} is CANCELLED but its setsid grandchild {escaped} still runs"
    assert marker.ends(job) == []
    check_invariants(stack.redis)
