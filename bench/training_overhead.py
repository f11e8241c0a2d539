"""Overhead of running the training loop under gpulab versus the same loop run bare.

Both runs use the same command (`python -m worker.training examples/digits.py`), the same
seed and the same machine, alternating bare / gpulab so drift hits both alike. Reported:
training throughput (samples/s over the run's optimizer steps, from the loop's own final
metrics) and, for the gpulab runs, submit -> first optimizer step split into gpulab's part
(submit -> process started) and Python/torch start-up (process started -> first step).

    python -m bench training [--runs 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.latency import BenchStack
from jobs.states import JobState

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits.py"
BATCH = 32  # examples/digits.py's default --batch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="runs of each kind (alternating)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="1 run each, 10 epochs")


def _throughput(metrics: dict[str, Any]) -> float:
    return float(metrics["steps"]) * BATCH / float(metrics["train_seconds"])


def bare_run(epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpulab-bare-") as tmp:
        status = Path(tmp) / "status.json"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPULAB_STATUS_FILE=str(status),
                   GPULAB_CHECKPOINT_DIR=str(Path(tmp) / "ckpt"), PYTHONPATH=str(ROOT))  # fmt: skip
        started = time.time()
        subprocess.run([sys.executable, "-m", "worker.training", str(DIGITS), "--epochs", str(epochs)],
                       env=env, cwd=tmp, check=True, capture_output=True)  # fmt: skip
        metrics = json.loads(status.read_text())["metrics"]
        return {"samples_per_s": _throughput(metrics), "to_first_step": metrics["first_step_at"] - started}


def gpulab_run(stack: BenchStack, epochs: int) -> dict[str, Any]:
    spec = {
        "command": [sys.executable, "-m", "worker.training", str(DIGITS), "--epochs", str(epochs)],
        "cwd": str(stack.root), "mem_bytes": 2 * 2**30, "kind": "training",
        "env": {k: v for k, v in stack.env.items() if k != "CUDA_VISIBLE_DEVICES"},
    }  # fmt: skip
    submitted = time.time()
    job_id = stack.api.submit(spec)
    record = stack.store.wait_final(job_id, 600)
    assert record is not None and record.state == JobState.COMPLETED and record.status is not None
    assert record.started_at is not None
    metrics = record.status["metrics"]
    return {
        "samples_per_s": _throughput(metrics),
        "to_first_step": metrics["first_step_at"] - submitted,
        "gpulab_part": record.started_at - submitted,
        "startup_part": metrics["first_step_at"] - record.started_at,
    }


def run(args: argparse.Namespace) -> str:
    runs, epochs = (1, 10) if args.quick else (args.runs, args.epochs)
    bare: list[dict[str, Any]] = []
    managed: list[dict[str, Any]] = []
    with BenchStack() as stack:
        for _ in range(runs):
            bare.append(bare_run(epochs))
            managed.append(gpulab_run(stack, epochs))
    b = statistics.median(r["samples_per_s"] for r in bare)
    g = statistics.median(r["samples_per_s"] for r in managed)
    lines = [
        f"examples/digits.py, {epochs} epochs, CPU, {runs} runs of each (median), alternating bare / gpulab",
        "",
        "| | samples/s | submit (or exec) -> first step (s) |",
        "| --- | ---: | ---: |",
        f"| bare `python -m worker.training` | {b:,.0f} | {statistics.median(r['to_first_step'] for r in bare):.2f} |",
        f"| under gpulab | {g:,.0f} | {statistics.median(r['to_first_step'] for r in managed):.2f} |",
        "",
        f"Overhead on throughput: {100 * (b - g) / b:+.1f}% (negative = gpulab run was faster).",
        f"Submit -> first step under gpulab: gpulab's part (submit -> process started) "
        f"{1000 * statistics.median(r['gpulab_part'] for r in managed):.0f} ms; "
        f"Python + torch start-up and data/model set-up (process started -> first step) "
        f"{statistics.median(r['startup_part'] for r in managed):.2f} s.",
        "Per run (samples/s): bare "
        + ", ".join(f"{r['samples_per_s']:,.0f}" for r in bare)
        + "; gpulab "
        + ", ".join(f"{r['samples_per_s']:,.0f}" for r in managed)
        + ".",
    ]
    text = "\n".join(lines)
    print(text)
    return text
