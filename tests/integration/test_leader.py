"""Several schedulers on one Redis, as real processes with their own state dirs and sockets
(one per "host"): every one serves the API, one leads the loop, a kill -9 of the leader
hands the loop over with no job lost or doubled, and a leader frozen at the worst moment
(right before its dispatch EXEC) cannot write when it wakes after its successor took over."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs import keys
from jobs.daemons import live_daemons
from jobs.invariants import violations
from jobs.states import JobState
from scheduler.dispatch import STOP_BEFORE_EXEC_ENV
from scheduler.instance import socket_lock
from tests.helpers.stack import Stack, release

# A short lease keeps the tests quick; the default (3 s) is what BENCHMARKS.md measures.
LEASE = {"leader_lease_s": 1.5}
LEADS = "this scheduler leads now"
FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def test_any_scheduler_serves_the_api_and_a_killed_leader_is_replaced(make_stack: Callable[..., Stack]) -> None:
    first: Stack = make_stack(scheduler=LEASE)
    second: Stack = make_stack(scheduler=LEASE)
    first.start_scheduler().wait_line(LEADS)
    follower = second.start_scheduler()
    second.start_worker("n1", "2x24GiB")

    # Every user path through the follower's socket.
    fifo = second.fifo("long")
    running = second.submit("--mem", "1GiB", *second.hold_job_args("1GiB", fifo))
    second.wait_state(running, JobState.RUNNING)
    held = second.submit("--hold", "--", "true")
    cancelled = second.submit("--after", str(running), "--", "true")  # waits for `running`
    listed = second.cli("queue")
    assert listed.returncode == 0 and str(running) in listed.stdout and str(held) in listed.stdout
    assert second.cli("show", str(running)).returncode == 0
    assert second.cli("hold", str(cancelled)).returncode == 0
    assert second.cli("cancel", str(cancelled)).returncode == 0
    assert second.cli("release", str(held)).returncode == 0
    assert second.cli("wait", str(held)).returncode == 0
    assert second.cli("logs", str(held)).returncode == 0
    assert "leads now" not in "\n".join(follower.lines)
    before = [second.submit("--mem", "1GiB", "--", "true") for _ in range(3)]
    for job_id in before:
        second.wait_state(job_id, *FINAL)

    assert first.scheduler is not None
    first.scheduler.stop(signal.SIGKILL)
    follower.wait_line(LEADS)
    after = [second.submit("--mem", "1GiB", "--", "true") for _ in range(3)]
    for job_id in after:
        assert second.wait_state(job_id, *FINAL).state == JobState.COMPLETED
    # The running job was untouched by the failover: same attempt, still running, ends well.
    assert second.store.get(running).state == JobState.RUNNING  # type: ignore[union-attr]
    release(fifo, 0)
    assert second.wait_state(running, *FINAL).state == JobState.COMPLETED
    for job_id in [running, held, *before, *after]:
        second.assert_ran_once(job_id)
    assert second.store.get(cancelled).state == JobState.CANCELLED  # type: ignore[union-attr]
    assert violations(second.redis) == []
    assert int(second.redis.get(keys.LEADER_EPOCH)) == 2


def test_a_leader_frozen_before_its_dispatch_exec_cannot_write_after_a_successor(
    make_stack: Callable[..., Stack],
) -> None:
    frozen: Stack = make_stack(scheduler=LEASE)
    successor: Stack = make_stack(scheduler=LEASE)
    frozen.env[STOP_BEFORE_EXEC_ENV] = "1"
    old = frozen.start_scheduler()
    old.wait_line(LEADS)
    new = successor.start_scheduler()
    successor.start_worker("n1", "1x24GiB")

    job_id = successor.submit("--mem", "20GiB", "--", "true")
    old.wait_line("test hook: stopping before dispatch EXEC")  # planned, MULTI queued, EXEC not sent
    new.wait_line(LEADS)  # the frozen leader's lease ran out in Redis; the follower took over
    assert successor.wait_state(job_id, *FINAL).state == JobState.COMPLETED
    epoch = int(successor.redis.get(keys.LEADER_EPOCH))
    assert epoch == 2

    old.proc.send_signal(signal.SIGCONT)  # it wakes and sends its EXEC
    old.wait_line("dispatch of 1 jobs refused: a newer leader holds the fence")
    old.wait_line("epoch 1 ends")
    successor.assert_ran_once(job_id)
    queued: Any = successor.redis.lrange(keys.rq_queue("n1"), 0, -1)
    assert queued == []  # no second launch entry was left for the worker
    assert successor.redis.hlen(keys.LEDGER) == 0
    assert violations(successor.redis) == []
    # The woken ex-leader is a follower now: jobs still flow, through its own socket too.
    later = frozen.submit("--mem", "20GiB", "--", "true")
    assert successor.wait_state(later, *FINAL).state == JobState.COMPLETED
    successor.assert_ran_once(later)
    assert int(successor.redis.get(keys.LEADER_EPOCH)) == epoch


def test_a_scheduler_refused_the_socket_leaves_no_presence_behind(make_stack: Callable[..., Stack]) -> None:
    """A second scheduler (its own state dir) pointed at a socket another one serves stops with
    one line; it had already checked in, and its presence stayed in Redis for 10 s as a live
    scheduler: `gpulab doctor` listed it, and a daemon of another version was refused meanwhile."""
    first: Stack = make_stack()
    first.start_scheduler()
    second: Stack = make_stack(scheduler={"socket": str(first.state_dir / "gpulab.sock")})
    refused = second.cli("scheduler")
    assert refused.returncode == 1 and "gpulab scheduler is already running" in refused.stderr, refused.stderr
    assert str(first.state_dir / "gpulab.sock") in refused.stderr
    daemons, _ = live_daemons(first.redis)
    assert [d.kind for d in daemons] == ["scheduler"], daemons
    assert first.scheduler is not None and daemons[0].pid == first.scheduler.proc.pid


def test_a_socket_path_is_served_by_one_scheduler_even_before_its_socket_exists(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """Two schedulers with state directories of their own, given one socket path and started
    at once, each found no live socket there, and one could unlink the other's between its
    bind and listen. The socket path is locked (`<socket>.lock`) for a scheduler's life: one
    that holds it, even before its socket exists, refuses the other."""
    sock = tmp_path / "shared" / "api.sock"
    sock.parent.mkdir()
    with socket_lock(sock):  # a scheduler about to bind there
        stack: Stack = make_stack(scheduler={"socket": str(sock)})
        refused = stack.cli("scheduler")
    assert refused.returncode == 1 and f"gpulab scheduler is already running (pid {os.getpid()}) on {sock}" in (
        refused.stderr
    ), refused.stderr
    assert not sock.exists()


def test_a_worker_that_cannot_start_says_why_in_one_line_and_leaves_no_presence(
    make_stack: Callable[..., Stack],
) -> None:
    """A worker whose node name a live worker holds, or (on a host without NVML) one started
    without --sim-gpus: one line, exit 1, and no presence left behind in Redis (it had
    checked in first, and counted as a live worker for 10 s); no traceback for the missing
    driver either."""
    stack: Stack = make_stack()
    live = stack.start_worker("n1")
    again = stack.cli("worker", "--name", "n1", "--sim-gpus", "1x24GiB")
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    from worker.nvml_probe import nvml_available

    if not nvml_available():
        no_gpu = stack.cli("worker", "--name", "n2")
        assert no_gpu.returncode == 1, no_gpu.stderr
        assert "Traceback" not in no_gpu.stderr and "NVML is unavailable" in no_gpu.stderr, no_gpu.stderr
    daemons, _ = live_daemons(stack.redis)
    assert [(d.kind, d.pid) for d in daemons] == [("worker", live.proc.pid)], daemons
