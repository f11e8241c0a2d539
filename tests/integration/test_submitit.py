"""The submitit plugin with the real `submitit` package on the real stack: code written for
`submitit.AutoExecutor` runs on gpulab with `cluster="gpulab"`. One stack for the module."""

from __future__ import annotations

import os
import pickle
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

import gpulab
from gpulab.submitit_plugin import GpulabExecutor, UnsafePickle
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, eventually


@pytest.fixture(scope="module")
def sock(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Path]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    stack = Stack(tmp_path_factory.mktemp("submitit"), redis_server.url, client)
    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    yield stack.state_dir / "gpulab.sock"
    stack.stop()
    client.close()


def executor(folder: Path, sock: Path, **params: object) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder, cluster="gpulab", gpulab_socket_path=str(sock))
    ex.update_parameters(**{"gpulab_mem_per_gpu": "1GiB", **params})
    return ex


def where_am_i(x: int) -> tuple[int, str, str]:
    env = submitit.JobEnvironment()
    return x * 2, os.environ["CUDA_VISIBLE_DEVICES"], f"{env.cluster}:{env.job_id}"


def boom(message: str) -> None:
    raise ValueError(message)


def nap(seconds: float) -> None:
    time.sleep(seconds)


class Marker:
    """Unpickling this creates a file: what a planted pickle would do to its loader."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.mkdir, (self.path, 0o700))


def test_autoexecutor_runs_a_call_on_gpulab_and_returns_its_result(sock: Path, tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    ex = executor(folder, sock, gpus_per_node=2, timeout_min=10, name="sweep")
    job = ex.submit(where_am_i, 21)
    value, devices, env = job.result()
    assert value == 42
    assert len(devices.split(",")) == 2 and devices.startswith("GPU-")
    assert env == f"gpulab:{job.job_id}"
    assert job.state == "COMPLETED" and job.done()
    record = gpulab.Client(sock).job(int(job.job_id)).record
    assert (record["name"], record["spec"]["gpus"], record["spec"]["mem_bytes"]) == ("sweep", 2, 2**30)
    assert record["spec"]["time_limit_s"] == 600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # made private: pickles are code
    assert stat.S_IMODE(job.paths.result_pickle.stat().st_mode) == 0o600


def test_an_exception_comes_back_with_its_traceback(sock: Path, tmp_path: Path) -> None:
    job = executor(tmp_path, sock).submit(boom, "the loss went NaN")
    with pytest.raises(FailedJobError, match="ValueError: the loss went NaN"):
        job.result()
    assert job.state == "FAILED"
    assert "ValueError: the loss went NaN" in job.stderr()  # gpulab's log of the job


def test_a_call_the_job_cannot_unpickle_fails_with_the_reason(sock: Path, tmp_path: Path) -> None:
    # A function from a module only the caller can import: pickled by reference, the job
    # (another process, without that directory on its path) cannot load it.
    private = tmp_path / "private_code"
    private.mkdir()
    (private / "only_here.py").write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(private))
    try:
        import only_here  # type: ignore[import-not-found]

        job = executor(tmp_path / "runs", sock).submit(only_here.f)
    finally:
        sys.path.remove(str(private))
    with pytest.raises(FailedJobError, match="No module named 'only_here'"):
        job.result()
    assert job.state == "FAILED"


def test_map_array_becomes_one_gpulab_array(sock: Path, tmp_path: Path) -> None:
    ex = executor(tmp_path, sock, gpulab_array_parallelism=2)
    jobs = ex.map_array(where_am_i, [1, 2, 3])
    assert [j.result()[0] for j in jobs] == [2, 4, 6]
    records = [gpulab.Client(sock).job(int(j.job_id)).record for j in jobs]
    assert {r["array_id"] for r in records} == {int(jobs[0].job_id)}
    assert [r["array_index"] for r in records] == [0, 1, 2]
    assert records[0]["spec"]["array"] == "0-2%2"


def test_cancel_ends_the_gpulab_job(sock: Path, tmp_path: Path) -> None:
    job = executor(tmp_path, sock).submit(nap, 600)
    gjob = gpulab.Client(sock).job(int(job.job_id))
    eventually(lambda: gjob.state == "RUNNING")
    job.cancel()
    job.wait()
    assert job.state == "CANCELLED"
    with pytest.raises(UncompletedJobError, match="ended CANCELLED"):
        job.result()


def test_a_result_planted_by_another_user_is_never_loaded(sock: Path, tmp_path: Path) -> None:
    job = executor(tmp_path, sock).submit(where_am_i, 1)
    job.wait()
    result = job.paths.result_pickle
    marker = tmp_path / "planted-pickle-ran"
    planted = pickle.dumps(("success", Marker(str(marker))))
    decoy = tmp_path / "decoy.pkl"
    decoy.write_bytes(planted)
    decoy.chmod(0o600)
    plants = {
        "world-writable": lambda: (result.write_bytes(planted), result.chmod(0o666)),
        "symlink": lambda: result.symlink_to(decoy),
        "fifo": lambda: os.mkfifo(result, 0o600),  # a blocking open would hang the caller
    }
    if os.geteuid() == 0:
        plants["other-owner"] = lambda: (result.write_bytes(planted), os.chown(result, 65534, 65534))
    for name, plant in plants.items():
        result.unlink()
        plant()
        with pytest.raises(UnsafePickle, match="refusing to load"):
            job.result()
        assert not marker.exists(), name


def test_bad_parameters_are_refused_before_submitting(sock: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nodes must be 1"):
        executor(tmp_path, sock, nodes=2)
    with pytest.raises(ValueError, match="tasks_per_node must be 1"):
        executor(tmp_path, sock, tasks_per_node=4)
    before = len(gpulab.Client(sock).jobs(all_jobs=True))
    with pytest.raises(gpulab.InvalidRequest, match="mem"):
        executor(tmp_path, sock, gpulab_mem_per_gpu="lots").submit(where_am_i, 1)
    assert len(gpulab.Client(sock).jobs(all_jobs=True)) == before
    assert not list(tmp_path.glob("*.pkl"))  # the pickle of a refused submit is removed


def test_the_plugin_is_found_through_submitits_entry_points() -> None:
    from submitit.core import plugins

    assert plugins.get_executors()["gpulab"] is GpulabExecutor
    assert "gpulab" in plugins.get_job_environments()
