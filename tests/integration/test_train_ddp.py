"""`gpulab train --gpus 2`: the built-in loop as DDP under torchrun (gloo on CPU, on two
simulated GPUs), checkpointed by rank 0 only, and resumed after a kill -9 and a requeue to the
same final loss as an uninterrupted DDP run of the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.states import JobState
from tests.helpers.stack import ROOT, Stack, eventually

SLOW = str(ROOT / "tests" / "helpers" / "slow_digits.py")
LOOP_ARGS = ("--epochs", "2", "--seed", "5")  # `gpulab train` adds --checkpoint-steps 10 below


@pytest.mark.slow
def test_ddp_on_two_gpus_checkpoints_on_rank_0_and_resumes_after_a_kill(stack: Stack, tmp_path: Path) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    stack.env["SLOW_STEP_S"] = "0.05"
    result = stack.cli("train", "--gpus", "2", "--mem", "1GiB", "--checkpoint-steps", "10", SLOW, *LOOP_ARGS)
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout)
    first = stack.wait_for(job_id, lambda r: r.state == JobState.RUNNING and r.pid is not None)
    assert len(first.gpus) == 2 and "torch.distributed.run" in first.spec.command
    checkpoints = stack.state_dir / "checkpoints" / str(job_id)
    eventually(lambda: list(checkpoints.glob("ckpt-*.pt")), timeout=240)
    stack.wait_log(job_id, "DDP rank 1/2 (gloo)")
    os.kill(first.pid, signal.SIGKILL)  # type: ignore[arg-type]  # torchrun itself: the whole job dies
    done = stack.wait_state(job_id, JobState.COMPLETED, timeout=300)
    assert done.attempt == 2 and done.status is not None
    assert (done.status["resumed_from_step"] or 0) >= 10
    newest = max(checkpoints.glob("ckpt-*.pt"))
    state = torch.load(newest, map_location="cpu", weights_only=False)
    assert (state["world_size"], state["saved_by_rank"], state["step"]) == (2, 0, done.status["step"])
    assert not any(k.startswith("module.") for k in state["model"])  # loadable by the 1-GPU loop

    # The same run uninterrupted, straight under torchrun: the resumed run ends at its loss.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPULAB_CHECKPOINT_DIR=str(tmp_path / "ck"),
               GPULAB_STATUS_FILE=str(tmp_path / "status.json"), PYTHONPATH=str(ROOT))  # fmt: skip
    env.pop("GPULAB_JOB_ID", None)
    argv = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "--no-python", sys.executable, "-P", "-m", "worker.training", SLOW, *LOOP_ARGS,
            "--checkpoint-every-steps", "10"]  # fmt: skip
    ran = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    clean = json.loads((tmp_path / "status.json").read_text())
    final, expected = done.status["metrics"]["final_loss"], clean["metrics"]["final_loss"]
    assert abs(final - expected) <= 1e-5 * max(1.0, abs(expected)), (final, expected)
