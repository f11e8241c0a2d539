"""The whole stack on a real GPU: a worker measuring through NVML, jobs packed by --mem,
memory attributed to each job's process tree, the training loop and its OOM handling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jobs.sizes import GiB
from jobs.states import JobState
from tests.helpers.stack import Stack, release

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _torch_hold(stack: Stack, size: str, fifo: Path) -> list[str]:
    return ["--", sys.executable, "-m", "tests.helpers.torch_hold", size, str(fifo)]


def test_two_jobs_share_one_gpu_by_mem_and_memory_is_attributed(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("gpu-node", sim_gpus=None)
    fifos = [stack.fifo(f"hold{i}") for i in range(2)]
    ids = [stack.submit("--mem", "6GiB", *_torch_hold(stack, "2GiB", f)) for f in fifos]
    records = [stack.wait_state(i, JobState.RUNNING) for i in ids]
    assert records[0].gpus[0].uuid == records[1].gpus[0].uuid, "both jobs should share GPU 0 (best fit)"
    for job_id in ids:
        line = stack.wait_log(job_id, "holding")
        assert line.endswith(records[0].gpus[0].uuid), "CUDA_VISIBLE_DEVICES must select the assigned GPU"
    # NVML per-process memory, attributed by process tree: each job holds >= 2 GiB (+ context).
    for job_id in ids:
        job = stack.wait_for(job_id, lambda r: sum(r.current_bytes.values()) >= 2 * GiB)
        print(f"job {job_id}: NVML-attributed {sum(job.current_bytes.values()) / GiB:.2f} GiB")
    gpus = json.loads(stack.cli("gpus", "--json").stdout)["nodes"][0]["gpus"]
    print("gpus:", json.dumps(gpus[0]))
    assert gpus[0]["jobs"] == 2 and gpus[0]["gpulab_reserved_bytes"] == 12 * GiB
    for f in fifos:
        release(f)
    for job_id in ids:
        done = stack.wait_state(job_id, JobState.COMPLETED)
        assert max(done.peak_bytes.values()) >= 2 * GiB


def test_over_request_training_job_ooms_alone_and_neighbour_completes(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("gpu-node", sim_gpus=None)
    fifo = stack.fifo("neighbour")
    neighbour = stack.submit("--mem", "4GiB", *_torch_hold(stack, "1GiB", fifo))
    stack.wait_log(neighbour, "holding")
    greedy = stack.cli("train", str(ROOT / "tests" / "gpu" / "oom_factory.py"), "--mem", "2GiB", "--epochs", "1")
    assert greedy.returncode == 0, greedy.stderr
    failed = stack.wait_state(int(greedy.stdout), JobState.FAILED)
    assert failed.reason == "OOM", (failed.reason, failed.detail)
    assert stack.store.get(neighbour).state == JobState.RUNNING  # type: ignore[union-attr]
    release(fifo)
    assert stack.wait_state(neighbour, JobState.COMPLETED).exit_code == 0


def test_example_trains_on_the_gpu(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("gpu-node", sim_gpus=None)
    result = stack.cli("train", str(ROOT / "examples" / "digits.py"), "--mem", "2GiB", "--epochs", "20")
    done = stack.wait_state(int(result.stdout), JobState.COMPLETED, timeout=240)
    assert done.status is not None
    print("digits on GPU:", json.dumps(done.status.get("metrics")), "peak", done.peak_bytes)
    assert done.status["metrics"]["test_accuracy"] >= 0.95
