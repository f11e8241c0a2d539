"""`python -m bench footprint`: what the daemons cost while nothing happens, and what waiting
jobs cost in Redis.

- scheduler and worker (one simulated 24 GiB GPU, default configuration): CPU% over a
  window (psutil, % of one core) and RSS/USS, idle with an empty queue;
- whether torch is loaded in either: /proc/PID/maps lists every shared object a process
  has mapped, and `import torch` always maps libtorch*.so;
- Redis: INFO used_memory before and after 10,000 held jobs submitted straight through
  `JobStore.submit` (job hash, pending index entry, per-job event stream, global event);
- the scheduler again, idle but with those 10,000 held jobs queued (its housekeeping
  passes still run every `housekeeping_interval_s`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import psutil

from bench.latency import BenchStack
from jobs import keys
from jobs.spec import JobSpec

MiB = 2**20


@dataclass(frozen=True)
class ProcStats:
    name: str
    cpu_pct: float
    rss: int
    uss: int
    torch_mapped: list[str]


def torch_libraries(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    return sorted(p for p in paths if "libtorch" in os.path.basename(p) or "/torch/" in p)


def sample(procs: dict[str, psutil.Process], window_s: float) -> list[ProcStats]:
    for p in procs.values():
        p.cpu_percent(None)  # starts the measuring interval
    time.sleep(window_s)  # the measurement window itself
    out = []
    for name, p in procs.items():
        cpu = p.cpu_percent(None)
        mem = p.memory_full_info()
        out.append(ProcStats(name, cpu, mem.rss, mem.uss, torch_libraries(p.pid)))
    return out


def used_memory(stack: BenchStack) -> int:
    return int(stack.redis.info("memory")["used_memory"])


def submit_held(stack: BenchStack, n: int) -> None:
    spec = JobSpec(
        command=("python", "train.py", "--lr", "3e-4"), cwd="/home/user/project", mem_bytes=12 * 2**30, hold=True
    )
    for _ in range(n):
        stack.store.submit(spec, user="bench", uid=os.getuid())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=float, default=10.0, help="seconds over which CPU is measured")
    p.add_argument("--held", type=int, default=10_000, help="held jobs for the Redis measurement")
    p.add_argument("--quick", action="store_true", help="a 5 s window")


def table(rows: list[ProcStats]) -> str:
    lines = [
        "| process | CPU (% of one core) | RSS (MiB) | USS (MiB) | libtorch mapped |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        torch = ", ".join(os.path.basename(p) for p in r.torch_mapped) or "no"
        lines.append(f"| {r.name} | {r.cpu_pct:.2f} | {r.rss / MiB:.1f} | {r.uss / MiB:.1f} | {torch} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    window = 5.0 if args.quick else args.window
    with BenchStack() as stack:
        procs = {
            "scheduler (idle, empty queue)": psutil.Process(stack.scheduler.proc.pid),
            "worker (idle, 1 simulated GPU)": psutil.Process(stack.worker.proc.pid),
        }
        time.sleep(1.0)  # past start-up: the first heartbeats and passes
        idle = sample(procs, window)
        before = used_memory(stack)
        started = time.perf_counter()
        submit_held(stack, args.held)
        submit_s = time.perf_counter() - started
        after = used_memory(stack)
        first = int(stack.redis.zrange(keys.PENDING, 0, 0)[0])
        parts = {
            "job hash": stack.redis.memory_usage(keys.job(first)),
            "its event stream": stack.redis.memory_usage(keys.job_events(first)),
        }
        time.sleep(2.0)  # the scheduler's passes take in the new jobs
        loaded = sample({f"scheduler ({args.held} held jobs queued)": procs["scheduler (idle, empty queue)"]}, window)
        last_pass = stack.redis.hget(keys.SCHEDULER_STATUS, "last_pass_ms")
    per_10k = (after - before) / args.held * 10_000
    text = (
        f"CPU over {window:g} s windows (psutil cpu_percent), memory at the end of the window:\n\n"
        f"{table(idle + loaded)}\n\n"
        f"Redis: used_memory {before / MiB:.2f} MiB -> {after / MiB:.2f} MiB after {args.held} held jobs "
        f"({per_10k / MiB:.1f} MiB per 10k jobs, {(after - before) / args.held:.0f} B per job; "
        f"submitted in {submit_s:.1f} s through JobStore.submit, one script call each). "
        f"MEMORY USAGE of one of them: " + ", ".join(f"{k} {v} B" for k, v in parts.items()) + ". "
        f"Scheduler's last pass with them queued: {last_pass.decode() if last_pass else '?'} ms."
    )
    print(text, flush=True)
    return text
