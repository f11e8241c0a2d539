"""The start gate (worker/runner.py + worker/shim.py): a job's command runs only after its
ASSIGNED -> RUNNING transition was accepted. Refused, fenced, Redis away, or stopped while
starting: the command never runs, and nothing of it is left."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from jobs.config import Config, WorkerConfig
from jobs.lifecycle import Transition
from jobs.record import GpuAssignment, JobRecord
from jobs.spec import JobSpec
from jobs.states import JobState, Reason
from jobs.store import Fenced, TransitionRefused
from tests.helpers.stack import eventually
from worker.runner import SHIM_ENV, SHIM_PATH, JobRunner
from worker.shim_server import ShimServer


@pytest.fixture(params=["exec", "served"])
def server(request: pytest.FixtureRequest) -> Iterator[ShimServer | None]:
    """Each test with an exec'd shim and with one forked by the worker's fork server."""
    if request.param == "exec":
        yield None
        return
    srv = ShimServer(SHIM_PATH, SHIM_ENV, ["--node", "n1", "--state-dir", "/nonexistent"])
    yield srv
    srv.close()


def _runner(
    tmp_path: Path, on_start: object, ends: list[Transition], server: ShimServer | None
) -> tuple[JobRunner, Path]:
    ran = tmp_path / "ran"
    spec = JobSpec(command=("/bin/sh", "-c", f"touch {ran}"), cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"})
    record = JobRecord(
        id=1,
        spec=spec,
        state=JobState.ASSIGNED,
        user="me",
        uid=os.geteuid(),
        node="n1",
        gpus=(GpuAssignment(0, "GPU-test-0"),),
        attempt=1,
    )
    config = Config(state_dir=tmp_path / "state", worker=WorkerConfig(lease_ttl_s=5, kill_grace_s=1))

    def transition(t: Transition) -> object:
        assert t.target == JobState.RUNNING
        assert t.fields["pid"] in {c.pid for c in psutil.Process().children(recursive=True)}
        return on_start(runner) if callable(on_start) else None  # type: ignore[operator]

    runner = JobRunner(
        record,
        config,
        "n1",
        simulated=False,
        store_transition=transition,
        record_end=lambda t, late_ok: ends.append(t),
        before_finish=lambda r: None,
        shim_python=lambda run_as: sys.executable,
        shim_server=server,
    )
    return runner, ran


def _raise(exc: BaseException) -> object:
    def start(_runner: JobRunner) -> object:
        raise exc

    return start


@pytest.mark.parametrize(
    "refusal",
    [
        TransitionRefused(1, JobState.RUNNING, "CANCELLED"),
        Fenced("another worker holds n1"),
        redis.ConnectionError("Redis went away"),
    ],
    ids=["refused", "fenced", "redis-down"],
)
def test_command_never_runs_when_the_start_is_not_recorded(
    tmp_path: Path, refusal: BaseException, server: ShimServer | None
) -> None:
    ends: list[Transition] = []
    runner, ran = _runner(tmp_path, _raise(refusal), ends, server)
    with pytest.raises(type(refusal)):
        runner.start()
    assert runner.proc is not None and runner.proc.poll() is not None, "the shim is still there"
    assert runner.job_pid is not None and not psutil.pid_exists(runner.job_pid)
    assert not ran.exists(), "the command ran although RUNNING was never recorded"
    assert ends == []  # nothing to record: the scheduler decides (it still sees ASSIGNED)


def test_cancel_while_starting_never_releases_the_command(tmp_path: Path, server: ShimServer | None) -> None:
    ends: list[Transition] = []
    runner, ran = _runner(tmp_path, lambda r: r.stop("cancelled"), ends, server)
    runner.start()
    eventually(lambda: runner.done.is_set())
    assert not ran.exists()
    (ending,) = ends
    assert (ending.target, ending.fields["reason"]) == (JobState.CANCELLED, Reason.CANCELLED.value)


def test_recorded_start_releases_the_command(tmp_path: Path, server: ShimServer | None) -> None:
    ends: list[Transition] = []
    runner, ran = _runner(tmp_path, None, ends, server)
    runner.start()
    eventually(lambda: runner.done.is_set())
    assert ran.exists()
    (ending,) = ends
    assert (ending.target, ending.fields["exit_code"]) == (JobState.COMPLETED, 0)
