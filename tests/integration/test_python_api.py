"""The Python API (package gpulab/) on the real stack: the README's example script, typed
jobs and typed errors. One stack for the module (its jobs do not interfere)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import gpulab
from scheduler.redis_server import RedisServer
from tests.helpers.stack import ROOT, Stack


@pytest.fixture(scope="module")
def api_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    stack = Stack(tmp_path_factory.mktemp("pyapi"), redis_server.url, client)
    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    yield stack
    stack.stop()
    client.close()


@pytest.fixture(scope="module")
def client(api_stack: Stack) -> gpulab.Client:
    return gpulab.Client(api_stack.state_dir / "gpulab.sock")


def test_the_example_script_runs_every_cell(api_stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py")],
        env=api_stack.env, cwd=api_stack.tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert ": COMPLETED exit 0: on GPU-" in out
    assert "squares [0, 1, 4, 9]" in out
    assert "epoch 3/3" in out and "test accuracy 0." in out
    assert "failed as expected: job" in out and "exit code 3" in out
    assert "refused before anything was stored: --mem: invalid size" in out


def test_a_job_object_follows_its_job(client: gpulab.Client, tmp_path: Path) -> None:
    job = client.submit([sys.executable, "-c", "print('hello from', __import__('os').getcwd())"],
                        mem="1GiB", hold=True, cwd=tmp_path)  # fmt: skip
    assert job.state == "HELD"
    with pytest.raises(gpulab.WaitTimeout):
        job.wait(timeout=0.5)
    job.release()
    assert job.wait(timeout=120) is job
    assert (job.state, job.exit_code, job.reason) == ("COMPLETED", 0, "")
    assert job.logs() == f"hello from {tmp_path}\n"
    assert job.logs(offset=6) == f"from {tmp_path}\n"
    assert "".join(job.follow()) == job.logs()
    assert job.node == "n1" and len(job.gpus) == 1 and job.gpus[0].startswith("GPU-")
    assert job.result is None  # not a training job
    assert client.job(job.id) == job
    assert job.id in {j.id for j in client.jobs(all_jobs=True)}
    assert job.id in {j.id for j in client.jobs(all_jobs=True, me=True, state="COMPLETED")}
    assert job.id not in {j.id for j in client.jobs(all_jobs=True, state="FAILED")}


def test_cancel_and_dependencies_take_job_objects(client: gpulab.Client) -> None:
    first = client.submit(["sleep", "600"], mem="1GiB", hold=True)
    second = client.submit(["true"], mem="1GiB", after=[first])
    assert second.state == "PENDING" and second.reason in ("Dependency", "")
    first.cancel()
    assert first.wait(timeout=60).state == "CANCELLED"
    ended = second.wait(timeout=60)
    assert (ended.state, ended.reason) == ("CANCELLED", "DependencyNeverSatisfied")
    with pytest.raises(gpulab.JobFailed) as failed:
        second.wait(check=True)
    assert failed.value.state == "CANCELLED" and failed.value.job_id == second.id


def test_errors_are_typed_and_store_nothing(client: gpulab.Client, api_stack: Stack, tmp_path: Path) -> None:
    before = len(client.jobs(all_jobs=True))
    with pytest.raises(gpulab.InvalidRequest, match="mem"):
        client.submit(["true"], mem="-3GiB")
    with pytest.raises(gpulab.InvalidRequest, match="command"):
        client.submit("python x.py")  # type: ignore[arg-type]  # a string, not an argv list
    with pytest.raises(gpulab.InvalidRequest, match="gpus"):
        client.submit(["true"], gpus=10_000)
    with pytest.raises(gpulab.InvalidRequest, match="Infeasible"):
        client.submit(["true"], mem="900GiB")
    with pytest.raises(TypeError, match="memory"):
        client.submit(["true"], memory="1GiB")  # type: ignore[call-arg]
    with pytest.raises(gpulab.InvalidRequest, match="no such file"):
        client.train(str(tmp_path / "missing.py"))
    assert len(client.jobs(all_jobs=True)) == before
    with pytest.raises(gpulab.JobNotFound):
        client.job(10**9)
    with pytest.raises(gpulab.SchedulerUnreachable, match="cannot reach"):
        gpulab.Client(tmp_path / "no.sock").jobs()
    # Every typed error is a GpulabError, and the standard base classes work too.
    assert issubclass(gpulab.JobNotFound, LookupError) and issubclass(gpulab.WaitTimeout, TimeoutError)
