"""A notebook-sized tour of gpulab's Python API (README.md, "Python API").

Run it against a running gpulab (`gpulab up --sim-gpus 2x24GiB &` first):

    python examples/python_api.py

Each block is one notebook cell: submit a command and read its output, run a small job
array, train the digits example with the built-in loop and read its metrics, and handle a
failure as a typed exception. tests/integration/test_python_api.py runs this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gpulab

HERE = Path(__file__).resolve().parent


def main() -> int:
    client = gpulab.Client()  # the scheduler's socket, found like the CLI finds it

    # 1. A command on a slice of a GPU: wait for it, then read its log.
    job = client.submit([sys.executable, "-c", "import os; print('on', os.environ['CUDA_VISIBLE_DEVICES'])"],
                        mem="2GiB", name="hello")  # fmt: skip
    job.wait(timeout=120)
    print(f"job {job.id}: {job.state} exit {job.exit_code}: {job.logs().strip()}")

    # 2. A job array: one task per index, each with GPULAB_ARRAY_INDEX.
    tasks = client.submit_array(
        [sys.executable, "-c", "import os; print(int(os.environ['GPULAB_ARRAY_INDEX']) ** 2)"],
        array="0-3%2",
        mem="1GiB",
    )
    squares = [int(task.wait(timeout=120).logs()) for task in tasks]
    print(f"array {tasks[0].id}: squares {squares}")

    # 3. The built-in training loop; `result` holds its last report and final metrics.
    run = client.train(str(HERE / "digits.py"), epochs=3, mem="2GiB")
    run.wait(timeout=300, check=True)
    assert run.result is not None
    print(f"train {run.id}: epoch {run.result.epoch}/{run.result.epochs} loss {run.result.loss:.3f} "
          f"test accuracy {run.result.metrics.get('test_accuracy')}")  # fmt: skip

    # 4. Failures are typed exceptions.
    bad = client.submit([sys.executable, "-c", "raise SystemExit(3)"], mem="1GiB")
    try:
        bad.wait(timeout=120, check=True)
    except gpulab.JobFailed as exc:
        print(f"job {bad.id} failed as expected: {exc} (exit code {exc.exit_code})")
    try:
        client.submit(["true"], mem="lots")
    except gpulab.InvalidRequest as exc:
        print(f"refused before anything was stored: {exc}")
    return 0 if job.state == "COMPLETED" and squares == [0, 1, 4, 9] else 1


if __name__ == "__main__":
    sys.exit(main())
