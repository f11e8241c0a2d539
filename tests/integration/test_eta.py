"""Start estimates on the real stack: every waiting job gets one (the queue simulated forward
with the running jobs' time limits), `queue` shows it in START, `show` and `--json` carry
it, a job no GPU can hold says "never", and the estimates follow the queue as it changes."""

from __future__ import annotations

import json
from collections.abc import Callable

from jobs.states import JobState
from tests.helpers.stack import Stack, release


def test_every_waiting_job_gets_a_start_that_follows_the_queue(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(scheduler={"eta_interval_s": 0.5, "eta_default_runtime_s": 3600})
    stack.start_scheduler()
    # Accepted while no node is online (one may come); the node that comes is too small.
    never = stack.submit("--mem", "30GiB", *stack.hold_job_args("0", stack.fifo("never")))
    stack.start_worker("n1", "1x24GiB")
    big_fifo = stack.fifo("big")
    big = stack.submit("--mem", "20GiB", "--time", "10m", *stack.hold_job_args("20GiB", big_fifo))
    running = stack.wait_state(big, JobState.RUNNING)
    assert running.started_at is not None
    big_end = running.started_at + 600
    short = stack.submit("--mem", "10GiB", "--time", "5m", *stack.hold_job_args("0", stack.fifo("short")))
    endless = stack.submit("--mem", "10GiB", *stack.hold_job_args("0", stack.fifo("endless")))
    after = stack.submit("--mem", "20GiB", "--time", "1m", *stack.hold_job_args("0", stack.fifo("after")))

    def near(expected: float) -> Callable[..., bool]:
        return lambda r: r.est_start_at is not None and abs(r.est_start_at - expected) < 1.0

    # Both 10 GiB jobs fit once the 20 GiB job ends at its limit; the next 20 GiB job also
    # waits for the one without a limit, which runs the default hour.
    stack.wait_for(short, near(big_end))
    stack.wait_for(endless, near(big_end))
    stack.wait_for(after, near(big_end + 3600))
    assert stack.wait_for(never, lambda r: r.reason == "Infeasible").est_start_at is None

    queue = stack.cli("queue", check=True).stdout
    header, *rows = queue.splitlines()
    assert "START" in header
    by_id = {row.split()[0]: row for row in rows}
    assert " in 9:" in by_id[str(short)] or " in 10:" in by_id[str(short)]
    assert " never " in by_id[str(never)]
    as_json = {j["id"]: j for j in json.loads(stack.cli("queue", "--json", check=True).stdout)["jobs"]}
    assert abs(as_json[short]["est_start_at"] - big_end) < 1.0
    assert as_json[big]["est_start_at"] is None  # running: no estimate
    show = stack.cli("show", str(after), check=True).stdout
    assert "Expected" in show and "est. start" in show
    assert "never: no GPU can hold it" in stack.cli("show", str(never), check=True).stdout

    # The queue changes: the big job ends early, the two 10 GiB jobs start, and the last
    # estimate moves up to the start of the one without a limit plus its default hour.
    release(big_fifo)
    endless_started = stack.wait_state(endless, JobState.RUNNING).started_at
    stack.wait_state(short, JobState.RUNNING)
    assert endless_started is not None
    stack.wait_for(after, lambda r: r.est_start_at is not None and r.est_start_at < big_end + 3600 - 60)
    assert stack.cli("cancel", str(short), str(endless), str(after), str(never)).returncode == 0
