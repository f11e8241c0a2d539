"""`python -m bench bulk`: hold / release / cancel of thousands of jobs, one API call per id
(what `gpulab release 1 2 ... 2000` used to do) versus one bulk call (what it does now).

A private redis-server, `python -m cli scheduler` and one simulated worker. The jobs depend
(`--after`) on a held job, so released ones stay PENDING and nothing runs. Jobs are submitted held, as
arrays of 1,000. Per-id calls go through `cli.client.ApiClient.action`; the bulk call through
`ApiClient.bulk_action`; the whole CLI command (`python -m cli release 1-N`, Python start-up
included) is timed as a subprocess.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.latency import BenchStack
from jobs.spec import JobSpec
from jobs.states import JobState


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=2000, help="jobs to act on (multiple of 1000 above 1000)")


def _submit_held(stack: BenchStack, n: int) -> list[int]:
    """n held jobs that, once released, wait on a held job that never runs: nothing starts."""
    gate = stack.api.submit(JobSpec(command=("true",), cwd="/", mem_bytes=2**30, hold=True).to_json())
    ids: list[int] = []
    while len(ids) < n:
        count = min(1000, n - len(ids))
        spec = JobSpec(command=("true",), cwd="/", mem_bytes=2**30, hold=True, array=f"0-{count - 1}", after_ok=(gate,))
        ids += stack.api.request("POST", "/v1/jobs", spec.to_json())["ids"]
    return ids


def _states(stack: BenchStack, ids: list[int]) -> set[str]:
    return {r.state.value for r in stack.store.get_many(ids)}


def _timed(label: str, fn: object, rows: list[str], n: int) -> None:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    wall = time.perf_counter() - t0
    rows.append(f"| {label} | {n} | {wall:.2f} | {wall / n * 1000:.2f} |")


def run(args: argparse.Namespace) -> str:
    n = args.jobs
    rows = ["| operation | jobs | wall (s) | per job (ms) |", "| --- | --- | --- | --- |"]
    with BenchStack() as stack:
        ids = _submit_held(stack, n)
        assert _states(stack, ids) == {JobState.HELD.value}
        _timed("release, one API call per id (before)", lambda: [stack.api.action(j, "release") for j in ids], rows, n)
        assert _states(stack, ids) == {JobState.PENDING.value}
        _timed("hold, one API call per id (before)", lambda: [stack.api.action(j, "hold") for j in ids], rows, n)
        _timed("release, one bulk call", lambda: stack.api.bulk_action("release", ids), rows, n)
        assert _states(stack, ids) == {JobState.PENDING.value}
        _timed("hold, one bulk call", lambda: stack.api.bulk_action("hold", ids), rows, n)
        assert _states(stack, ids) == {JobState.HELD.value}
        argv = [sys.executable, "-m", "cli", "release", f"{ids[0]}-{ids[-1]}"]

        def cli() -> None:
            subprocess.run(argv, env=stack.env, stdout=subprocess.DEVNULL, check=True)

        _timed(f"`gpulab release {ids[0]}-{ids[-1]}` (CLI process, start-up included)", cli, rows, n)
        assert _states(stack, ids) == {JobState.PENDING.value}
        _timed("cancel, one bulk call", lambda: stack.api.bulk_action("cancel", ids), rows, n)
        assert _states(stack, ids) == {JobState.CANCELLED.value}
    return "\n".join(["## Bulk cancel / hold / release", "", *rows, ""])
