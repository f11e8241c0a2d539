"""Redis stalls (a slow fsync, a fork, a paused VM; here a spinning script) longer than the
worker's call timeout while a job ends: the worker's calls time out and are sent again,
and Redis runs the first sends as well once it is free. The job's end is recorded once and
its output reads back whole and once, from another host's point of view (`gpulab logs`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, release
from tests.helpers.stall import stalled

# Prints a line every 20 ms (so a shipping tick is always on its way) until the FIFO is
# written, then its last line.
CHATTY_THEN_LAST = (
    "import os, sys, select\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n"
    "print('first line', flush=True)\n"
    "n = 0\n"
    "while not select.select([fd], [], [], 0.02)[0] or not os.read(fd, 16):\n"
    "    n += 1; print(f'tick {n}', flush=True)\n"
    "print('last line', flush=True)\n"
)


def test_a_job_that_ends_while_redis_stalls_is_recorded_and_shown_once(
    make_stack: Callable[..., Stack], redis_server: RedisServer
) -> None:
    """The whole path on real daemons (the shipper's part is pinned down in test_joblog.py:
    an end announced while a tick was on its way lost the job's last line; a resent append
    stored output twice): the job ends, its last output is shipped and its end recorded
    while Redis stalls past the worker's call timeout."""
    stack: Stack = make_stack(worker={"lease_ttl_s": 10})  # calls time out at 2.5 s; shims fence at 7.5 s
    stack.start_scheduler()
    stack.start_worker("n1")
    fifo = stack.fifo("end")
    job = stack.submit("--mem", "1GiB", "--", sys.executable, "-c", CHATTY_THEN_LAST, str(fifo))
    stack.wait_state(job, JobState.RUNNING)
    stack.wait_log(job, "tick 2")
    with stalled(redis_server.url, 4000):
        release(fifo, 0)  # the job prints its last line and exits while a tick is on its way
    record = stack.wait_state(job, JobState.COMPLETED, JobState.FAILED, JobState.PENDING)
    assert record.state == JobState.COMPLETED, record
    stack.assert_ran_once(job)
    shown = stack.cli_bytes("logs", str(job))
    assert shown.returncode == 0, shown.stderr
    written = (stack.state_dir / "logs" / f"{job}.log").read_bytes()
    assert shown.stdout == written, (shown.stdout[-200:], written[-200:])  # whole, nothing twice
    assert shown.stdout.endswith(b"last line\n")
    states = [e["state"] for e in stack.store.history(job)]
    assert states.count("COMPLETED") == 1, states
