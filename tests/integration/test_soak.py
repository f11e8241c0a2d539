"""Soak: many clients submitting while the worker is restarted. Marked slow; runs in CI."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from jobs import keys
from jobs.states import JobState
from tests.helpers.stack import ROOT, Stack, eventually

pytestmark = pytest.mark.slow

CLIENTS, PER_CLIENT = 20, 50


def test_1000_concurrent_submits_while_the_worker_restarts_twice(stack: Stack) -> None:
    stack.start_scheduler()
    worker = stack.start_worker("n1", "2x24GiB")
    socket_path = str(stack.state_dir / "gpulab.sock")
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.submitter", socket_path, str(PER_CLIENT)],
            cwd=ROOT,
            env=stack.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(CLIENTS)
    ]
    total = CLIENTS * PER_CLIENT
    # Restart the worker twice while the submissions pour in: once cleanly, once kill -9.
    for how, finished in ((signal.SIGTERM, 100), (signal.SIGKILL, 400)):
        eventually(lambda n=finished: stack.redis.zcard(keys.FINISHED) >= n, timeout=300)  # type: ignore[misc]
        worker.stop(how)
        stack.daemons.remove(worker)
        worker = stack.start_worker("n1", "2x24GiB")
    ids: list[int] = []
    for client in clients:
        out, _ = client.communicate(timeout=300)
        assert client.returncode == 0
        ids += [int(line) for line in out.split()]
    assert sorted(ids) == list(range(1, total + 1))  # exactly 1,000 jobs, unique ids
    for job_id in ids:
        assert stack.wait_state(job_id, JobState.COMPLETED, timeout=300).exit_code == 0
    assert int(stack.redis.get(keys.NEXT_JOB_ID)) == total
    assert stack.redis.hlen(keys.LEDGER) == 0 and stack.redis.scard(keys.ACTIVE) == 0
    # No job ever ran twice at once: its history alternates RUNNING with a way out of it.
    for job_id in ids:
        running = False
        for event in stack.store.history(job_id):
            if event["state"] == "RUNNING":
                assert not running, f"job {job_id} started again while running"
                running = True
            elif event["state"] in ("PENDING", "HELD", "COMPLETED", "FAILED", "CANCELLED"):
                running = False
