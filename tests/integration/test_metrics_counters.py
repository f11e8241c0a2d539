"""Prometheus counters are real counters: kept in Redis, so they never go down - not when the
scheduler restarts, not when finished records leave the history - and the wait histogram
counts every start, not the last hour's."""

from __future__ import annotations

import sys
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from jobs import keys
from jobs.states import JobState
from tests.helpers.stack import Stack, free_port
from tests.integration.test_ops import get


def _values(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


COMPLETED = ("gpulab_jobs_finished_total", (("reason", ""), ("state", "COMPLETED")))
FAILED = ("gpulab_jobs_failed_total", ())
STARTED = ("gpulab_jobs_started_total", ())
WAITS = ("gpulab_job_wait_seconds_count", ())
WAIT_INF = ("gpulab_job_wait_seconds_bucket", (("le", "+Inf"),))


def test_counters_survive_restarts_and_history_trims(make_stack: Callable[..., Stack]) -> None:
    port = free_port()
    stack = make_stack(scheduler={"metrics_port": port})
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    ok = [stack.submit("--mem", "1GiB", "--", sys.executable, "-c", "pass") for _ in range(2)]
    bad = stack.submit("--mem", "1GiB", "--", sys.executable, "-c", "raise SystemExit(3)")
    for job in ok:
        stack.wait_state(job, JobState.COMPLETED)
    stack.wait_state(bad, JobState.FAILED)
    before = _values(port)
    assert before[COMPLETED] == 2 and before[FAILED] == 1 and before[STARTED] == 3
    assert before[WAITS] == 3 == before[WAIT_INF]

    # The history forgets the jobs (as a trim of old records would), and the scheduler restarts.
    stack.redis.delete(keys.FINISHED)
    assert stack.scheduler is not None
    stack.scheduler.stop()
    stack.daemons.remove(stack.scheduler)
    stack.start_scheduler()
    after = _values(port)
    for key in (COMPLETED, FAILED, STARTED, WAITS, WAIT_INF):
        assert after[key] == before[key], key

    more = stack.submit("--mem", "1GiB", "--", sys.executable, "-c", "pass")
    stack.wait_state(more, JobState.COMPLETED)
    later = _values(port)
    assert later[COMPLETED] == 3 and later[STARTED] == 4 and later[WAITS] == 4
    # Counted once each, whoever folds: the scheduler's loop and every scrape share one cursor.
    assert _values(port)[COMPLETED] == 3
