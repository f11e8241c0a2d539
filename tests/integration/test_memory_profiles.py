"""Learned memory profiles, `--mem auto` and enforcement of requests, through the real stack
(real redis-server, scheduler and worker daemons, simulated GPUs). One stack for the module."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs import keys
from jobs.profiles import Sample
from jobs.sizes import GiB, MiB
from jobs.states import JobState, Reason
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, eventually, release, test_config

GRACE_S = 1.0


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    config = test_config(memory={"auto_min_runs": 2, "enforce": "stop", "enforce_grace_s": GRACE_S})
    stack = Stack(tmp_path_factory.mktemp("memprof"), redis_server.url, client, config_text=config)
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    yield stack
    stack.stop()
    client.close()


def run_holding(stack: Stack, size_file: Path, size: int, fifo: Path, *submit: str) -> int:
    """One run of the same command (same argv) holding `size` bytes; returns its id once done."""
    size_file.write_text(str(size))
    job_id = stack.submit(*submit, "--", sys.executable, "-m", "tests.helpers.hold_job", f"@{size_file}", str(fifo))
    stack.wait_for(job_id, lambda r: max(r.peak_bytes.values(), default=0) >= size)
    release(fifo)
    record = stack.wait_state(job_id, JobState.COMPLETED)
    # The run goes into its profile just after its end is recorded.
    eventually(lambda: any(s.job_id == job_id for s in stack.store.profile_samples(record.profile_key)))
    return job_id


def test_finished_runs_teach_the_request_and_show_where_it_came_from(mstack: Stack) -> None:
    size_file, fifo = mstack.tmp_path / "size", mstack.fifo("learn")
    first = run_holding(mstack, size_file, 3 * GiB, fifo, "--mem", "6GiB")
    record = mstack.store.get(first)
    assert record is not None and record.profile_key and record.mem_origin == ""
    # Too few runs yet: --mem auto takes a whole GPU and says why.
    size_file.write_text(str(GiB))
    early = mstack.cli("submit", "--mem", "auto", "--hold", "--", sys.executable, "-m", "tests.helpers.hold_job",
                       f"@{size_file}", str(fifo))  # fmt: skip
    assert early.returncode == 0, early.stderr
    assert "1 of the 2 runs" in early.stderr
    mstack.cli("cancel", early.stdout.strip(), check=True)
    run_holding(mstack, size_file, 4 * GiB, fifo, "--mem", "6GiB")
    samples = mstack.store.profile_samples(record.profile_key)
    assert sorted(s.peak for s in samples) == [3 * GiB, 4 * GiB]

    auto = mstack.cli("submit", "--mem", "auto", "--hold", "--", sys.executable, "-m", "tests.helpers.hold_job",
                      f"@{size_file}", str(fifo))  # fmt: skip
    assert auto.returncode == 0, auto.stderr
    expected = -(-int(4 * GiB * 1.05) // MiB) * MiB
    assert "from 2 runs, p95 + 5%" in auto.stderr
    job = mstack.store.get(int(auto.stdout))
    assert job is not None and job.spec.mem_bytes == expected and job.spec.mem_auto
    shown = mstack.cli("show", auto.stdout.strip())
    assert "from 2 runs, p95 + 5%" in shown.stdout
    # With enough runs, no --mem at all means the learned request too (not a whole GPU).
    default = mstack.cli("submit", "--hold", "--", sys.executable, "-m", "tests.helpers.hold_job",
                         f"@{size_file}", str(fifo))  # fmt: skip
    assert mstack.store.get(int(default.stdout)).spec.mem_bytes == expected  # type: ignore[union-attr]
    # --exclusive keeps a whole GPU whatever the profile says.
    whole = mstack.cli("submit", "--exclusive", "--hold", "--", sys.executable, "-m", "tests.helpers.hold_job",
                       f"@{size_file}", str(fifo))  # fmt: skip
    assert mstack.store.get(int(whole.stdout)).spec.mem_bytes is None  # type: ignore[union-attr]
    for job_id in (auto.stdout, default.stdout, whole.stdout):
        mstack.cli("cancel", job_id.strip(), check=True)

    listing = json.loads(mstack.cli("profile", "--json", check=True).stdout)
    [mine] = [p for p in listing["profiles"] if p["profile_key"] == record.profile_key]
    assert mine["runs"] == 2 and mine["request_bytes"] == expected and "hold_job" in mine["label"]
    history = json.loads(mstack.cli("history", "--json", check=True).stdout)
    assert any(j["id"] == first and max(j["peak_bytes"].values()) == 3 * GiB for j in history["jobs"])


def test_a_job_lying_about_its_peak_cannot_lower_or_blow_up_its_profile(mstack: Stack) -> None:
    """The status file is the job's: a claim over its GPU's size is dropped; a claim under what
    the worker measured changes nothing (the profile keeps the larger, measured figure)."""
    script = mstack.tmp_path / "liar.py"
    script.write_text(
        "import json, os, sys, pathlib\n"
        "claim = int(sys.argv[1])\n"
        "gpu = os.environ['CUDA_VISIBLE_DEVICES'].split(',')[0]\n"
        "d = pathlib.Path(os.environ['GPULAB_SIM_DIR']) / gpu\n"
        "(d / str(os.getpid())).write_text(str(2 * 2**30))\n"
        "json.dump({'kind': 'training', 'peak_bytes': claim}, open(os.environ['GPULAB_STATUS_FILE'], 'w'))\n"
        "open(sys.argv[2]).read()\n"
    )
    fifo = mstack.fifo("liar")
    for claim in (2**50, 1):
        job_id = mstack.submit("--mem", "3GiB", "--", sys.executable, str(script), str(claim), str(fifo))
        mstack.wait_for(job_id, lambda r: max(r.peak_bytes.values(), default=0) >= 2 * GiB)
        release(fifo)
        record = mstack.wait_state(job_id, JobState.COMPLETED)
        [sample] = eventually(
            lambda: [s for s in mstack.store.profile_samples(record.profile_key) if s.job_id == job_id]  # noqa: B023
        )
        assert sample.peak == 2 * GiB
        assert sample.allocator_peak == (None if claim == 2**50 else 1)


def test_profile_samples_are_written_once_per_attempt_and_only_by_the_node_holder(mstack: Stack) -> None:
    from jobs.lifecycle import Fence
    from jobs.store import Fenced

    store, fence = mstack.store, Fence(keys.node_epoch("n1"), mstack.redis.get(keys.node_epoch("n1")).decode())  # type: ignore[union-attr]
    sample = Sample(999, 1, GiB, 1.0)
    kwargs = {"window": 3, "max_profiles": 10, "ttl_s": 60}
    assert store.add_profile_sample("eve", sample, "d" * 32, fence, **kwargs) is True
    assert store.add_profile_sample("eve", sample, "d" * 32, fence, **kwargs) is False  # a replayed end
    with pytest.raises(Fenced):
        store.add_profile_sample("eve", Sample(998, 1, GiB, 1.0), "d" * 32, Fence(fence.key, "stale"), **kwargs)
    for n in range(5):
        store.add_profile_sample("eve", Sample(n, 1, n, 1.0), "d" * 32, fence, **kwargs)
    assert len(store.profile_samples("d" * 32)) == 3  # the window


def test_over_request_job_is_warned_then_stopped_and_its_behaving_neighbour_runs_on(mstack: Stack) -> None:
    fifo = mstack.fifo("neighbour")
    neighbour = mstack.submit("--mem", "8GiB", "--", sys.executable, "-m", "tests.helpers.hold_job", "1GiB", str(fifo))
    mstack.wait_state(neighbour, JobState.RUNNING)
    # Placed by its 4 GiB request, it then takes 20 GiB: 3 GiB stay free, the neighbour is owed 7.
    hog = mstack.submit("--mem", "4GiB", "--", sys.executable, "-m", "worker.sim_alloc", "20GiB", "--delay", "0.5",
                        "--until-signal")  # fmt: skip
    ended = mstack.wait_state(hog, JobState.FAILED)
    assert ended.reason == Reason.OOM and "over its request" in ended.detail
    events = [e.get("detail", "") for e in mstack.store.history(hog)]
    assert any(d.startswith("memory warning: uses 20") for d in events), events
    mstack.wait_log(hog, "gpulab: memory warning")
    assert mstack.store.get(neighbour).state == JobState.RUNNING  # type: ignore[union-attr]
    assert not mstack.store.get(neighbour).mem_warning  # type: ignore[union-attr]
    release(fifo)
    mstack.wait_state(neighbour, JobState.COMPLETED)
    # The stopped run taught its profile: a lower bound, marked as out of memory.
    [sample] = eventually(lambda: [s for s in mstack.store.profile_samples(ended.profile_key) if s.job_id == hog])
    assert sample.oom and sample.peak >= 20 * GiB


def test_an_over_user_alone_on_its_gpu_is_not_stopped(mstack: Stack) -> None:
    fifo = mstack.fifo("alone")
    size_file = mstack.tmp_path / "alone-size"
    size_file.write_text(str(10 * GiB))
    job_id = mstack.submit("--mem", "2GiB", "--", sys.executable, "-m", "tests.helpers.hold_job", f"@{size_file}",
                           str(fifo))  # fmt: skip
    record = mstack.wait_for(job_id, lambda r: bool(r.mem_warning))  # the old warning: over its --mem
    assert "more than its --mem" in record.mem_warning
    release(fifo)
    done = mstack.wait_state(job_id, JobState.COMPLETED, JobState.FAILED)
    assert done.state == JobState.COMPLETED
    assert not any("memory warning" in e.get("detail", "") for e in mstack.store.history(job_id))


@pytest.mark.slow
def test_train_without_mem_asks_for_the_pre_run_estimate(mstack: Stack) -> None:
    """No --mem and no profile yet: the CLI traces one step in a child process and the job asks
    for that estimate plus the margin; `show` says where the number came from."""
    root = Path(__file__).resolve().parents[2]
    result = mstack.cli("train", str(root / "examples" / "digits.py"), "--hold", "--epochs", "1", "--", "--batch", "48")
    assert result.returncode == 0, result.stderr
    assert "estimated peak" in result.stderr and "from the pre-run estimate" in result.stderr
    job = mstack.store.get(int(result.stdout))
    assert job is not None and job.spec.mem_estimate is not None and job.spec.mem_estimate > 0
    assert job.spec.mem_bytes is not None and job.spec.mem_bytes >= job.spec.mem_estimate
    assert "pre-run estimate" in mstack.cli("show", result.stdout.strip()).stdout
    mstack.cli("cancel", result.stdout.strip(), check=True)
