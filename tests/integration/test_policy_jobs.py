"""Arrays, dependencies, caps, node drain and submit-time refusals, through the real stack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs import keys
from jobs.api import ApiError
from jobs.config import Config
from jobs.states import JobState
from scheduler.service import Caller, SchedulerService
from tests.helpers.stack import TEST_CONFIG, Stack, release


def _max_running(stack: Stack, ids: set[int]) -> int:
    """The most of `ids` ever RUNNING at once, replayed from the global event stream."""
    running: set[int] = set()
    most = 0
    for _id, fields in stack.redis.xrange(keys.EVENTS):
        job, state = int(fields[b"job"]), fields[b"state"].decode()
        if job not in ids:
            continue
        if state == "RUNNING":
            running.add(job)
        elif state in ("COMPLETED", "FAILED", "CANCELLED", "PENDING"):
            running.discard(job)
        most = max(most, len(running))
    return most


def test_array_tasks_get_their_index_and_the_throttle_holds(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifos = [stack.fifo(f"task-{i}") for i in range(5)]
    fifo = f"{stack.tmp_path}/task-$GPULAB_ARRAY_INDEX"
    script = f'echo "index $GPULAB_ARRAY_INDEX of $GPULAB_ARRAY_TASK_COUNT"; cat "{fifo}" > /dev/null'
    array_id = stack.submit("--array", "0-4%2", "--mem", "1GiB", "--name", "sweep", "--", "sh", "-c", script)
    tasks = list(range(array_id, array_id + 5))
    started_or_throttled = lambda r: r.state == JobState.RUNNING or r.reason == "JobArrayTaskLimit"  # noqa: E731
    records = [stack.wait_for(t, started_or_throttled) for t in tasks]
    assert [r.array_index for r in records] == [0, 1, 2, 3, 4] and {r.array_id for r in records} == {array_id}
    assert [r.state for r in records[:2]] == [JobState.RUNNING] * 2
    assert all(r.state == JobState.PENDING and "at most 2" in r.detail for r in records[2:])
    stack.env["COLUMNS"] = "220"
    assert "sweep[2-4%2]" in stack.cli("queue").stdout  # pending tasks share one row
    for i in range(5):
        release(fifos[i])
        stack.wait_state(tasks[i], JobState.COMPLETED)
    assert _max_running(stack, set(tasks)) == 2
    assert [stack.cli("logs", str(t)).stdout.strip() for t in tasks] == [f"index {i} of 5" for i in range(5)]


def test_dependency_chain_runs_in_order(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    first = stack.submit("--hold", "--mem", "1GiB", "--", "true")
    second = stack.submit("--after", str(first), "--mem", "1GiB", "--", "true")
    third = stack.submit("--after", str(second), "--mem", "1GiB", "--", "true")
    waiting = stack.wait_for(second, lambda r: r.reason == "Dependency")
    assert f"waiting for job {first}" in waiting.detail
    assert stack.cli("release", str(first)).returncode == 0
    stack.wait_state(third, JobState.COMPLETED)
    order = [(int(f[b"job"]), f[b"state"].decode()) for _, f in stack.redis.xrange(keys.EVENTS)]
    assert order.index((first, "COMPLETED")) < order.index((second, "ASSIGNED"))
    assert order.index((second, "COMPLETED")) < order.index((third, "ASSIGNED"))


def test_failed_dependency_cancels_dependents_but_not_after_any(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    failing = stack.submit("--hold", "--mem", "1GiB", "--", "false")
    dependent = stack.submit("--after", str(failing), "--mem", "1GiB", "--", "true")
    grandchild = stack.submit("--after", str(dependent), "--mem", "1GiB", "--", "true")
    cleanup = stack.submit("--after-any", str(failing), "--mem", "1GiB", "--", "true")
    stack.wait_for(cleanup, lambda r: r.reason == "Dependency")
    stack.cli("release", str(failing))
    assert stack.wait_state(failing, JobState.FAILED).exit_code == 1
    cancelled = stack.wait_state(dependent, JobState.CANCELLED)
    assert (cancelled.reason, cancelled.detail) == ("DependencyNeverSatisfied", f"dependency {failing} ended FAILED")
    assert stack.wait_state(grandchild, JobState.CANCELLED).reason == "DependencyNeverSatisfied"
    assert stack.wait_state(cleanup, JobState.COMPLETED).exit_code == 0
    assert stack.cli("wait", str(dependent)).returncode == 1
    refused = stack.cli("submit", "--after", "9999", "--", "true")
    assert refused.returncode == 2 and "--after: no job 9999" in refused.stderr


def test_impossible_requests_are_refused_at_submit(stack: Stack) -> None:
    stack.start_scheduler()
    early = stack.submit("--mem", "100GiB", "--", "true")  # no node online yet: it may come
    assert stack.wait_for(early, lambda r: r.reason == "Resources").detail == "no worker is online"
    stack.start_worker("n1", "2x24GiB")
    before = stack.redis.get(keys.NEXT_JOB_ID)
    for args, words in (
        (["--mem", "30GiB"], "largest GPU offers"),
        (["--gpus", "3", "--mem", "1GiB"], "largest node has 2"),
        (["--gpu-model", "H100"], "--gpu-model 'H100'"),
        (["--node", "nosuch"], "no node named 'nosuch'"),
    ):
        result = stack.cli("submit", *args, "--", "true")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (args, result.stderr)
    assert stack.redis.get(keys.NEXT_JOB_ID) == before  # nothing stored
    placed = stack.submit("--gpu-model", "simulated", "--node", "n1", "--gpus", "2", "--exclusive", "--mem", "20GiB",
                          "--", "true")  # fmt: skip
    assert stack.wait_state(placed, JobState.COMPLETED).node == "n1"
    assert "largest GPU offers" in stack.wait_for(early, lambda r: r.reason == "Infeasible").detail


def test_user_cap_keeps_the_second_job_waiting(tmp_path: Path, redis_server: Any, redis_client: redis.Redis) -> None:
    stack = Stack(tmp_path, redis_server.url, redis_client, TEST_CONFIG + "\n[policy]\nmax_running_per_user = 1\n")
    try:
        stack.start_scheduler()
        stack.start_worker("n1", "1x24GiB")
        fifo = stack.fifo("one")
        first = stack.submit("--mem", "1GiB", *stack.hold_job_args("0", fifo))
        stack.wait_state(first, JobState.RUNNING)
        second = stack.submit("--mem", "1GiB", "--", "true")
        waiting = stack.wait_for(second, lambda r: r.reason == "UserLimit")
        assert "max_running_per_user = 1" in waiting.detail
        release(fifo)
        stack.wait_state(second, JobState.COMPLETED)
    finally:
        stack.stop()


def test_drained_node_takes_no_new_jobs_and_finishes_running_ones(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifo = stack.fifo("running")
    running = stack.submit("--mem", "1GiB", *stack.hold_job_args("0", fifo))
    stack.wait_state(running, JobState.RUNNING)
    assert stack.cli("node", "drain", "n1", "--reason", "maintenance").returncode == 0
    gpus = json.loads(stack.cli("gpus", "--json").stdout)["nodes"][0]
    assert gpus["draining"] and "maintenance" in gpus["drain_reason"]
    newcomer = stack.submit("--mem", "1GiB", "--", "true")
    assert stack.wait_for(newcomer, lambda r: r.reason == "Resources").detail == "every online node is draining"
    pinned = stack.submit("--node", "n1", "--mem", "1GiB", "--", "true")
    assert stack.wait_for(pinned, lambda r: r.reason == "ReqNodeNotAvail").detail == "node n1 is draining"
    release(fifo)
    assert stack.wait_state(running, JobState.COMPLETED).exit_code == 0  # running ones finish
    assert stack.cli("node", "resume", "n1").returncode == 0
    stack.wait_state(newcomer, JobState.COMPLETED)
    stack.wait_state(pinned, JobState.COMPLETED)
    assert stack.cli("node", "drain", "nosuch").returncode == 2


def test_only_admins_may_submit_for_another_user(redis_client: redis.Redis) -> None:
    service = SchedulerService(Config(), redis_client)
    body = {"command": ["true"], "cwd": "/", "user": "root"}
    with pytest.raises(ApiError) as refused:
        service.submit(Caller(uid=4242, user="mallory", pid=1), body)
    assert refused.value.status == 403
    with pytest.raises(ApiError) as unknown:
        service.submit(Caller(uid=0, user="root", pid=1), {**body, "user": "no-such-user-here"})
    assert unknown.value.status == 400 and "no user 'no-such-user-here'" in unknown.value.message
    assert service.submit(Caller(uid=0, user="root", pid=1), body)["id"] == 1
    with pytest.raises(ApiError) as drain:
        service.drain(Caller(uid=4242, user="mallory", pid=1), "n1", "")
    assert drain.value.status == 403


def test_after_an_array_id_waits_for_every_task(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    array_id = stack.submit("--hold", "--array", "0-1", "--mem", "1GiB", "--", "true")
    after = stack.submit("--after", str(array_id), "--mem", "1GiB", "--", "true")
    stack.wait_for(after, lambda r: r.reason == "Dependency")
    assert stack.cli("release", str(array_id)).returncode == 0
    stack.wait_state(array_id, JobState.COMPLETED)
    assert stack.store.get(after).state == JobState.PENDING  # type: ignore[union-attr]  # task 1 is still held
    assert stack.cli("release", str(array_id + 1)).returncode == 0
    stack.wait_state(after, JobState.COMPLETED)
    order = [(int(f[b"job"]), f[b"state"].decode()) for _, f in stack.redis.xrange(keys.EVENTS)]
    assert order.index((array_id + 1, "COMPLETED")) < order.index((after, "ASSIGNED"))
