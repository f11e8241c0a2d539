"""`python -m bench drain`: how long a 1,000-task array of `true` takes through a real stack,
against the bare machine starting the same 1,000 processes with `xargs -P 8`.

The stack is bench/latency.py's: a private redis-server, `python -m cli scheduler` and one
`python -m cli worker` on simulated GPUs (default 8x80GiB, so the tasks' 1 GiB each never
wait for memory), the built-in default configuration. The array is submitted through the
API client (one request); the clock runs from just before that request until every task
is COMPLETED (read from the records: the last `ended_at`). Every task goes through the
whole path: placement, dispatch through RQ, the worker's launch, the per-job shim and its
start gate, the end recorded through the worker's journal.

The bare figure is `seq N | xargs -P 8 -n 1 true`, timed the same way (wall clock), run
right before and after the stack (the machine is shared: the median of those runs).
`--cpu` also prints the CPU seconds each process spent over the drains (psutil).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import time

import psutil

from bench.latency import BenchStack, GiB
from jobs import keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=1000, help="array tasks (default 1000)")
    p.add_argument("--sim-gpus", default="8x80GiB", help="the worker's simulated GPUs (default 8x80GiB)")
    p.add_argument("--runs", type=int, default=1, help="arrays drained, one after another, on one stack (default 1)")
    p.add_argument("--quick", action="store_true", help="200 tasks")
    p.add_argument("--cpu", action="store_true", help="also print the CPU seconds each process spent over the drains")


def cpu_seconds(stack: BenchStack) -> dict[str, float]:
    """CPU (user + system) so far of redis-server, the scheduler, the worker, and the worker's
    children (its shim server, with the shims and commands it reaped)."""
    def own(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    out = {}
    assert stack.redis_server.proc is not None
    for name, pid in (("redis-server", stack.redis_server.proc.pid), ("scheduler", stack.scheduler.proc.pid),
                      ("worker", stack.worker.proc.pid)):  # fmt: skip
        out[name] = own(psutil.Process(pid))
    shims = 0.0
    for child in psutil.Process(stack.worker.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            shims += t.user + t.system + t.children_user + t.children_system
    out["shim server + shims + commands"] = shims
    return out


def bare(tasks: int) -> float:
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", "8", "-n", "1", "true"], input="\n".join(["x"] * tasks), text=True, check=True)
    return time.perf_counter() - started


def drain(stack: BenchStack, tasks: int) -> tuple[float, float]:
    """(seconds from submit to the last task's end, seconds from submit to the last start)."""
    spec = {"command": ["true"], "cwd": str(stack.root), "mem_bytes": GiB, "name": "drain", "array": f"0-{tasks - 1}"}
    t0 = time.time()
    first = int(stack.api.submit(spec))
    ids = list(range(first, first + tasks))
    deadline = time.monotonic() + 600
    while stack.redis.zcount(keys.FINISHED, t0, "+inf") < tasks:  # ended since the submit
        if time.monotonic() > deadline:
            raise RuntimeError("the array did not drain in 10 minutes")
        time.sleep(0.05)  # polling the finished index: the benchmark's own cost, off the path measured
    records = stack.store.get_many(ids)
    failed = [r.id for r in records if r.state.value != "COMPLETED"]
    if failed:
        bad = next(r for r in records if r.id == failed[0])
        why = f"{bad.state.value} {bad.reason} {bad.detail}"
        raise RuntimeError(f"{len(failed)} tasks did not complete, e.g. job {bad.id}: {why}")
    last_end = max(r.ended_at or 0.0 for r in records)
    last_start = max(r.started_at or 0.0 for r in records)
    return last_end - t0, last_start - t0


def run(args: argparse.Namespace) -> str:
    tasks = 200 if args.quick else args.tasks
    bare_s = [bare(tasks)]
    results = []
    spent: dict[str, float] = {}
    with BenchStack(sim_gpus=args.sim_gpus) as stack:
        drain(stack, 20)  # the shim server starts with the first launch
        before = cpu_seconds(stack)
        for _ in range(args.runs):
            results.append(drain(stack, tasks))
        spent = {k: v - before.get(k, 0.0) for k, v in cpu_seconds(stack).items()}
    bare_s.append(bare(tasks))
    bare_med = statistics.median(bare_s)
    lines = [
        f"Array drain: {tasks} tasks of `true`, one worker ({args.sim_gpus} simulated), default configuration",
        "",
        "| what | seconds | tasks/s | x bare |",
        "|---|---:|---:|---:|",
        f"| `xargs -P 8 -n 1 true` (bare; runs: {', '.join(f'{b:.2f}' for b in bare_s)}) | {bare_med:.2f} "
        f"| {tasks / bare_med:,.0f} | 1.0 |",
    ]
    for n, (end_s, start_s) in enumerate(results, 1):
        lines.append(f"| gpulab run {n}: submit -> last task ended | {end_s:.2f} | {tasks / end_s:,.0f} "
                     f"| {end_s / bare_med:.1f} |")  # fmt: skip
        lines.append(f"| gpulab run {n}: submit -> last task started | {start_s:.2f} | - | - |")
    if args.cpu:
        per = ", ".join(f"{k} {v:.2f}" for k, v in spent.items())
        lines += ["", f"CPU seconds over the {args.runs} drain(s): {per}"]
    text = "\n".join(lines)
    print(text)
    return text
