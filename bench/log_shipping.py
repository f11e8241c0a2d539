"""`python -m bench logs`: job output through Redis (worker/logship.py, jobs/joblog.py).

A private redis-server, `python -m cli scheduler` and one simulated worker, default
`[worker] log_*` settings. Measures:

- latency to a line for a follower: a job prints a line stamped with its wall clock every
  0.2 s; a follower long-polls the API like `gpulab logs -f` (`ApiClient.log(wait_s=10)`)
  and notes when each line arrives (one host, one clock);
- a flood: a job writes 64 KiB blocks as fast as it can for `--flood-s` seconds; its write
  rate under gpulab vs the same program writing to a file outside gpulab, the worker
  process's CPU meanwhile, the worst heartbeat age, what reached Redis;
- a job writing just under `log_rate` (200 KiB/s): how much of it reaches Redis;
- Redis memory per job (MEMORY USAGE of its two keys) for a 100-line job and a job at the cap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import psutil

from bench.latency import BenchStack
from jobs import keys
from jobs.spec import JobSpec
from jobs.states import JobState

STAMPED = (
    "import sys, time\n"
    "for i in range({n}):\n"
    "    print(f'line {{i}} {{time.time():.6f}}', flush=True)\n"
    "    time.sleep(0.2)\n"
)
FLOOD = (  # at most 1 GiB: the whole log stays on the node's disk
    "import os, sys, time\n"
    "block = b'x' * 65535 + b'\\n'\n"
    "t0 = time.monotonic()\n"
    "end = t0 + {seconds}\n"
    "n = 0\n"
    "while time.monotonic() < end and n < 2**30:\n"
    "    n += os.write(1, block)\n"
    "sys.stderr.write(f'wrote {{n}} {{time.monotonic() - t0}}\\n')\n"
)
PACED = (
    "import sys, time\n"
    "line = 'p' * 1023 + '\\n'\n"
    "for _ in range({seconds} * 10):\n"
    "    sys.stdout.write(line * 20); sys.stdout.flush(); time.sleep(0.1)\n"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lines", type=int, default=40, help="stamped lines for the latency run")
    p.add_argument("--flood-s", type=int, default=10, help="seconds of flooding")


def _submit(stack: BenchStack, program: str) -> int:
    spec = JobSpec(command=(sys.executable, "-c", program), cwd="/", mem_bytes=2**30)
    return stack.api.submit(spec.to_json())


def _wait(stack: BenchStack, job: int) -> None:
    record = stack.store.wait_final(job, 600)
    assert record is not None and record.state == JobState.COMPLETED, record


def latency(stack: BenchStack, n: int) -> list[float]:
    job = _submit(stack, STAMPED.format(n=n))
    offset, got, pending = 0, [], ""
    while True:
        chunk = stack.api.log(job, offset, wait_s=10.0)
        now = time.time()
        offset = chunk["offset"]
        pending += chunk["data"]
        *lines, pending = pending.split("\n")
        got += [now - float(line.split()[2]) for line in lines if line.startswith("line ")]
        if chunk["final"] and not chunk["more"]:
            return got


def _heartbeat_age(stack: BenchStack) -> float:
    raw = stack.redis.get(keys.node("n1"))
    seconds, micros = stack.redis.time()
    return seconds + micros / 1e6 - float(json.loads(raw)["sent_at"]) if raw else float("inf")


def _bare_rate(stack: BenchStack, seconds: int) -> float:
    """The flood program writing to a file outside gpulab: this disk's own speed now."""
    path = stack.root / "bare.log"
    with open(path, "wb") as out:
        bare = subprocess.run(
            [sys.executable, "-c", FLOOD.format(seconds=seconds)], stdout=out, stderr=subprocess.PIPE, text=True
        )
    path.unlink()
    return int(bare.stderr.split()[1]) / float(bare.stderr.split()[2])


def flood(stack: BenchStack, seconds: int) -> dict[str, float]:
    before_bare = _bare_rate(stack, seconds)
    worker = psutil.Process(stack.worker.proc.pid)
    redis_before = int(stack.redis.info("memory")["used_memory"])
    cpu_before = sum(worker.cpu_times()[:2])
    t0 = time.monotonic()
    job = _submit(stack, FLOOD.format(seconds=seconds))
    worst = 0.0
    stop = threading.Event()

    def watch() -> None:
        nonlocal worst
        while not stop.wait(0.1):
            worst = max(worst, _heartbeat_age(stack))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _wait(stack, job)
    stop.set()
    watcher.join()
    wall = time.monotonic() - t0
    cpu = sum(worker.cpu_times()[:2]) - cpu_before
    meta = {k.decode(): int(v) for k, v in stack.redis.hgetall(keys.job_log_meta(job)).items()}
    bare_before, bare_after = before_bare, _bare_rate(stack, seconds)
    said = (stack.state_dir / "logs" / f"{job}.log").read_bytes()[-200:].split(b"wrote ")[-1].split()
    return {
        "written": meta["end"],
        "rate": int(said[0]) / float(said[1]),
        "bare_rate": bare_before,
        "bare_after": bare_after,
        "worker_cpu": cpu / wall,
        "worst_beat": worst,
        "stored": meta["stored"],
        "dropped": meta["dropped"],
        "redis_growth": int(stack.redis.info("memory")["used_memory"]) - redis_before,
        "job_bytes": stack.redis.memory_usage(keys.job_log(job)) + stack.redis.memory_usage(keys.job_log_meta(job)),
    }


def paced(stack: BenchStack, seconds: int) -> dict[str, int]:
    job = _submit(stack, PACED.format(seconds=seconds))
    _wait(stack, job)
    meta = {k.decode(): int(v) for k, v in stack.redis.hgetall(keys.job_log_meta(job)).items()}
    return meta


def small_job_bytes(stack: BenchStack) -> int:
    job = _submit(stack, "for i in range(100): print(f'epoch {i} loss 0.{i:04d} samples/s 1234.5')")
    _wait(stack, job)
    return int(stack.redis.memory_usage(keys.job_log(job)) + stack.redis.memory_usage(keys.job_log_meta(job)))


def run(args: argparse.Namespace) -> str:
    with BenchStack() as stack:
        lat = sorted(latency(stack, args.lines))
        small = small_job_bytes(stack)
        fl = flood(stack, args.flood_s)
        pc = paced(stack, 5)
    p50, p95 = statistics.median(lat), lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    mib = 2**20
    return "\n".join(
        [
            "## Job output through Redis (`gpulab logs -f` from any host)",
            "",
            "| measurement | result |",
            "| --- | --- |",
            f"| line written -> line at a follower (long-poll), {len(lat)} lines | p50 {p50 * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms |",
            f"| flood {args.flood_s} s: job's write rate under gpulab | {fl['rate'] / mib:.0f} MiB/s "
            f"({fl['written'] / mib:.0f} MiB) |",
            f"| same program writing to a file outside gpulab, before / after | {fl['bare_rate'] / mib:.0f} / "
            f"{fl['bare_after'] / mib:.0f} MiB/s |",
            f"| worker process CPU during the flood | {fl['worker_cpu'] * 100:.1f}% of one core |",
            f"| worst heartbeat age during the flood (interval 1 s) | {fl['worst_beat']:.2f} s |",
            f"| flood: kept in Redis / not kept | {fl['stored'] / 1024:.0f} KiB / {fl['dropped'] / mib:.0f} MiB |",
            f"| flood: Redis used_memory growth / MEMORY USAGE of its keys | {fl['redis_growth'] / 1024:.0f} KiB / "
            f"{fl['job_bytes'] / 1024:.0f} KiB |",
            f"| job writing 200 KiB/s for 5 s (log_rate 256 KiB/s): shipped / not kept | "
            f"{pc['end'] - pc['dropped']} / {pc['dropped']} bytes |",
            f"| Redis memory of a 100-line job's log (MEMORY USAGE, both keys) | {small} bytes |",
            "",
        ]
    )
