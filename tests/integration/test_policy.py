"""Scheduling policy through the real stack: fair share between users, reservations for a
big job behind a stream of small ones, the reasons and priority parts `queue` shows."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import Any

from jobs.states import JobState
from tests.helpers.stack import TEST_CONFIG, Stack, release
from tests.helpers.users import USERS, needs_users

GIB = 2**30


def shared_fifo(folder: Path, name: str) -> Path:
    path = folder / name
    os.mkfifo(path, 0o644)
    return path


def sh_hold_spec(fifo: Path, mem_gib: int, user: str) -> dict[str, Any]:
    """Blocks on the FIFO like tests/helpers/hold_job.py, in plain sh (another user cannot
    run the venv's python), submitted on behalf of `user` (tests run as root, an admin)."""
    return {
        "command": ["sh", "-c", 'read code < "$0"; exit "${code:-0}"', str(fifo)],
        "cwd": str(fifo.parent),
        "mem_bytes": mem_gib * GIB,
        "env": {"PATH": "/usr/bin:/bin"},
        "user": user,
    }


def cancel_all(stack: Stack, ids: list[int]) -> None:
    assert stack.cli("cancel", *map(str, ids)).returncode == 0
    for job_id in ids:
        stack.wait_for(job_id, lambda r: r.is_final)


@needs_users
def test_second_users_jobs_start_before_the_first_users_backlog_drains(
    stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")  # three 7 GiB jobs at a time
    alice_specs = [sh_hold_spec(shared_fifo(shared_dir, f"a{i}"), 7, USERS[0]) for i in range(50)]
    alice = [stack.api.submit(spec) for spec in alice_specs]
    for job_id in alice[:3]:
        stack.wait_state(job_id, JobState.RUNNING)
    stack.wait_for(alice[3], lambda r: r.reason == "Resources")
    # The CLI's way: an admin submits for bob.
    bob_commands = [sh_hold_spec(shared_fifo(shared_dir, f"b{i}"), 7, "")["command"] for i in range(5)]
    # From a directory bob may enter: his jobs start there, as him (pytest's tmp dir is root's).
    submit = [("submit", "--user", USERS[1], "--mem", "7GiB", "--", *command) for command in bob_commands]
    bob = [int(stack.cli(*argv, cwd=shared_dir, check=True).stdout) for argv in submit]
    for job_id in bob:
        record = stack.wait_for(job_id, lambda r: r.reason == "Resources")
        assert (record.user, record.uid) == (USERS[1], users[USERS[1]].pw_uid)
    queue = {j["id"]: j for j in json.loads(stack.cli("queue", "--json").stdout)["jobs"]}
    # sprio-style parts: bob has used nothing, alice has three jobs running.
    assert queue[bob[0]]["priority"]["fairshare"] > queue[alice[3]]["priority"]["fairshare"]
    assert queue[bob[0]]["priority"]["total"] > queue[alice[3]]["priority"]["total"]
    stack.start_worker("n2", "2x24GiB")  # room for six more: bob's five go first
    for job_id in bob:
        assert stack.wait_state(job_id, JobState.RUNNING).node == "n2"
    still_waiting = [r for r in stack.store.get_many(alice) if r.state == JobState.PENDING]
    assert len(still_waiting) >= 45  # alice's backlog is far from drained
    cancel_all(stack, alice + bob)


def test_big_job_behind_a_stream_of_small_ones_starts_within_its_reservation(
    tmp_path: Path, redis_server: Any, redis_client: Any
) -> None:
    stack = Stack(tmp_path, redis_server.url, redis_client, TEST_CONFIG + "\n[policy]\nreserve_after_s = 0\n")
    try:
        stack.start_scheduler()
        stack.start_worker("n1", "2x24GiB")
        fifos = {i: stack.fifo(f"s{i}") for i in range(6)}
        small = {
            i: stack.submit("--mem", "7GiB", "--time", "10m", *stack.hold_job_args("0", f)) for i, f in fifos.items()
        }
        gpu_of = {i: stack.wait_state(j, JobState.RUNNING).gpus[0].index for i, j in small.items()}
        big_fifo = stack.fifo("big")
        big = stack.submit("--mem", "20GiB", "--time", "10m", *stack.hold_job_args("0", big_fifo))
        waiting = stack.wait_for(big, lambda r: "reserved" in r.detail and r.est_start_at is not None)
        held_gpu = int(waiting.detail.rsplit("GPU ", 1)[1].split()[0].rstrip(";"))
        bound = waiting.est_start_at
        assert bound is not None
        starts = [r.started_at or 0.0 for r in stack.store.get_many(small[i] for i in small if gpu_of[i] == held_gpu)]
        latest_end = max(starts) + 600
        assert abs(bound - latest_end) < 1.0  # the estimate: when the last small job there must end
        # The stream goes on: small jobs without a time limit keep arriving.
        stream_fifos = [stack.fifo(f"t{i}") for i in range(3)]
        stream = [stack.submit("--mem", "7GiB", *stack.hold_job_args("0", f)) for f in stream_fifos]
        other = [i for i in small if gpu_of[i] != held_gpu]
        mine = [i for i in small if gpu_of[i] == held_gpu]
        release(fifos[other[0]])  # room on the other GPU: the stream may use it
        assert stack.wait_state(stream[0], JobState.RUNNING).gpus[0].index != held_gpu
        release(fifos[mine[0]])  # room on the held GPU: not for the stream
        blocked = stack.wait_for(stream[1], lambda r: r.reason == "Priority")
        assert f"held for job {big}" in blocked.detail
        release(fifos[mine[1]])
        release(fifos[mine[2]])
        started = stack.wait_state(big, JobState.RUNNING)
        assert started.gpus[0].index == held_gpu
        assert started.started_at is not None and started.started_at <= bound
        assert stack.store.get(stream[1]).state == JobState.PENDING  # type: ignore[union-attr]
        release(big_fifo)
        for i in other[1:]:
            release(fifos[i])
        release(stream_fifos[0])
        stack.wait_state(big, JobState.COMPLETED)
        cancel_all(stack, stream)
    finally:
        stack.stop()


def test_queue_shows_reasons_and_priority_parts_for_pending_jobs(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifo = stack.fifo("big")
    running = stack.submit("--mem", "20GiB", *stack.hold_job_args("0", fifo))
    stack.wait_state(running, JobState.RUNNING)
    waiting = stack.submit("--mem", "10GiB", "--priority", "7", "--", "true")
    stack.wait_for(waiting, lambda r: r.reason == "Resources")
    job = next(j for j in json.loads(stack.cli("queue", "--json").stdout)["jobs"] if j["id"] == waiting)
    parts = job["priority"]
    assert parts["priority"] == 7 and parts["fairshare"] > 0 and parts["age"] >= 0
    assert abs(parts["total"] - (parts["priority"] + parts["fairshare"] + parts["age"])) < 0.01
    stack.env["COLUMNS"] = "220"  # rich fits tables to the terminal; give it a wide one
    text = stack.cli("queue").stdout
    assert "PRIORITY" in text and f"{parts['total']:.0f} = 7+" in text
    assert "Resources" in text and "needs 1x10.0GiB" in text
    release(fifo)
    stack.wait_state(waiting, JobState.COMPLETED)
