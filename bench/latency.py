"""`python -m bench latency`: submit -> start latency of a real stack on simulated GPUs.

A private redis-server (free port, the production settings of scheduler/redis_server.py),
`python -m cli scheduler` and one `python -m cli worker --sim-gpus 1x24GiB`, with
the built-in default configuration. Jobs are submitted one at a time through the API client
(`cli.client.ApiClient`, HTTP over the scheduler's Unix socket: the CLI's own path minus
the CLI's Python start-up), each waiting for the previous one to finish, so every job meets
an idle GPU. Each job is a tiny static C program that prints CLOCK_REALTIME as its first
act; the job record gives ASSIGNED (`assigned_at`, the scheduler's dispatch) and
`started_at` (written by the worker right after fork/exec returns). Then again with a
backlog of jobs that cannot start sitting in the queue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from cli.client import ApiClient
from jobs import keys
from jobs.spec import JobSpec
from jobs.store import JobStore
from scheduler.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
STAMP_C = '#include <stdio.h>\n#include <time.h>\nint main(void){struct timespec t;clock_gettime(CLOCK_REALTIME,&t);printf("%lld.%09ld\\n",(long long)t.tv_sec,t.tv_nsec);return 0;}\n'  # noqa: E501


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, argv: list[str], env: dict[str, str], ready: str, timeout_s: float = 60.0) -> None:
        pipe, out = subprocess.PIPE, subprocess.STDOUT
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=pipe, stderr=out, text=True
        )
        self.lines: list[str] = []
        seen = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if ready in line:
                    seen.set()
            seen.set()

        threading.Thread(target=pump, daemon=True).start()
        if not seen.wait(timeout_s) or self.proc.poll() is not None:
            raise RuntimeError(f"{argv[3:]} did not start:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class BenchStack:
    """redis-server + scheduler + one simulated worker in a temporary directory."""

    def __init__(self, sim_gpus: str = "1x24GiB", config_text: str = "") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gpulab-bench-"))
        self.state_dir = self.root / "state"
        self.state_dir.mkdir()
        (self.root / "config.toml").write_text(config_text)
        self.sim_gpus = sim_gpus
        self.redis_server = RedisServer(self.root / "redis", port=free_port())
        self.daemons: list[Daemon] = []
        self.env = dict(
            os.environ,
            GPULAB_STATE_DIR=str(self.state_dir),
            GPULAB_REDIS_URL=self.redis_server.url,
            GPULAB_CONFIG=str(self.root / "config.toml"),
            PYTHONPATH=str(ROOT),
        )

    def __enter__(self) -> BenchStack:
        self.redis_server.start()
        self.redis = redis.Redis.from_url(self.redis_server.url)
        self.store = JobStore(self.redis)
        cli = [sys.executable, "-m", "cli"]
        self.scheduler = Daemon([*cli, "scheduler"], self.env, "scheduler ready")
        self.daemons.append(self.scheduler)
        self.worker = Daemon([*cli, "worker", "--name", "n1", "--sim-gpus", self.sim_gpus], self.env, "worker ready")
        self.daemons.append(self.worker)
        self.api = ApiClient(self.state_dir / "gpulab.sock")
        return self

    def __exit__(self, *exc: object) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.redis.close()
        self.redis_server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def stamp_program(folder: Path) -> tuple[list[str], str]:
    """argv of a job that prints the wall clock at its first instruction, and what it is."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        source, binary = folder / "stamp.c", folder / "stamp"
        source.write_text(STAMP_C)
        for flags in (["-static"], []):
            if subprocess.run([cc, "-O2", *flags, "-o", str(binary), str(source)], capture_output=True).returncode == 0:
                linked = "static" if flags else "dynamic"
                return [str(binary)], f"C program ({linked}), clock_gettime(CLOCK_REALTIME) first thing in main()"
    return ["/bin/bash", "-c", "echo $EPOCHREALTIME"], "bash -c 'echo $EPOCHREALTIME' (no C compiler found)"


@dataclass(frozen=True)
class Sample:
    ack: float  # API answered (the job is stored)
    assigned: float
    started: float  # the worker's started_at
    first_instruction: float  # the job's own clock


def measure(stack: BenchStack, n: int, argv: list[str]) -> list[Sample]:
    spec = {"command": argv, "cwd": str(stack.root), "mem_bytes": GiB, "name": "latency"}
    samples = []
    for _ in range(n):
        t0 = time.time()
        job_id = stack.api.submit(spec)
        ack = time.time()
        record = stack.store.wait_for(job_id, lambda r: r.is_final, 60.0)
        if record is None or not record.is_final or record.exit_code != 0:
            raise RuntimeError(f"job {job_id} did not complete: {record}")
        log = Path(record.log_path or stack.state_dir / "logs" / f"{job_id}.log")
        stamp = float(log.read_text().split()[0])
        assert record.assigned_at is not None and record.started_at is not None
        samples.append(Sample(ack - t0, record.assigned_at - t0, record.started_at - t0, stamp - t0))
    return samples


def add_backlog(stack: BenchStack, n: int, kind: str) -> None:
    """`n` jobs that cannot start: held, or asking 32 GiB of a 24 GiB GPU (Infeasible)."""
    big = kind == "too-big"
    spec = JobSpec(command=("/bin/true",), cwd=str(stack.root), mem_bytes=32 * GiB if big else GiB, hold=not big)
    for _ in range(n):
        stack.store.submit(spec, user="bench", uid=os.getuid())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def row(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"| {label} | {pct(ms, 50):.1f} | {pct(ms, 99):.1f} | {max(ms):.1f} |"


def report(title: str, samples: list[Sample], pass_ms: str) -> str:
    lines = [
        f"**{title}** ({len(samples)} jobs; scheduler's last pass: {pass_ms} ms)",
        "",
        "| submit -> | p50 (ms) | p99 (ms) | max (ms) |",
        "| --- | --- | --- | --- |",
        row("API answered (job stored)", [s.ack for s in samples]),
        row("ASSIGNED (scheduler dispatched)", [s.assigned for s in samples]),
        row("started_at (worker, after exec)", [s.started for s in samples]),
        row("first instruction of the job", [s.first_instruction for s in samples]),
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=200, help="jobs per scenario")
    p.add_argument("--backlog", type=int, default=1000, help="jobs that cannot start, queued in scenarios 2 and 3")
    p.add_argument("--quick", action="store_true", help="at most 100 jobs per scenario")
    p.add_argument(
        "--profile", type=Path, help="then py-spy the scheduler (10 s) under the same load; raw stacks to this folder"
    )


def settle(stack: BenchStack, since: float, timeout_s: float = 60.0) -> None:
    """Wait until a scheduler pass that began after `since` has finished (it saw the backlog)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at, ms = stack.redis.hmget(keys.SCHEDULER_STATUS, "last_pass_at", "last_pass_ms")
        if at is not None and float(at) - float(ms or 0) / 1000 > since:
            return
        time.sleep(0.05)  # polling a status hash the scheduler rewrites every pass: bounded
    raise RuntimeError("the scheduler did not finish a pass over the backlog in time")


def run(args: argparse.Namespace) -> str:
    n = min(args.jobs, 100) if args.quick else args.jobs
    scenarios = [
        ("idle GPU, empty queue", ""),
        (f"{args.backlog} held jobs in the queue", "held"),
        (f"{args.backlog} pending jobs that can never fit (32 GiB on a 24 GiB GPU: Infeasible)", "too-big"),
    ]
    out: list[str] = []
    for title, kind in scenarios:
        with BenchStack() as stack:  # a fresh stack per scenario: backlogs do not add up
            argv, what = stamp_program(stack.root)
            if not out:
                print(f"latency: job = {what}; {n} jobs per scenario, one at a time, via ApiClient (Unix socket)")
            measure(stack, 5, argv)  # warm-up: first imports, first RQ queue
            if kind:
                add_backlog(stack, args.backlog, kind)
                settle(stack, time.time())
            samples = measure(stack, n, argv)
            status = stack.redis.hget(keys.SCHEDULER_STATUS, "last_pass_ms")
            out.append(report(title, samples, status.decode() if status else "?"))
            print(out[-1] + "\n", flush=True)
            spy = start_profile(stack, args.profile, kind) if args.profile and kind else None
            if spy is not None:  # profiled separately: py-spy's sampling slows the process down
                while spy.poll() is None:
                    measure(stack, 1, argv)
                out.append(profile_summary(args.profile / f"scheduler_{kind}.txt"))
                print(out[-1] + "\n", flush=True)
    return "\n\n".join(out)


def start_profile(stack: BenchStack, folder: Path, kind: str) -> subprocess.Popen[bytes] | None:
    """py-spy (raw collapsed stacks) on the scheduler for 10 s, if py-spy is installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy); not profiling")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"scheduler_{kind}.txt"
    pid = str(stack.scheduler.proc.pid)
    argv = [spy, "record", "-p", pid, "-o", str(out), "--format", "raw", "--threads", "-d", "10", "-r", "200"]
    print(f"profiling the scheduler into {out}")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_summary(path: Path, rate: int = 200, seconds: int = 10, top: int = 10) -> str:
    """The scheduler's main thread from py-spy's collapsed stacks: how busy it was (py-spy
    skips idle samples, e.g. blocked in BLPOP) and which gpulab functions held the time."""
    if not path.exists():
        return f"(no profile at {path})"
    total = 0
    inclusive: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        total += int(count)
        mine = {f for f in frames[1:] if f.split("(")[-1].startswith(("scheduler/", "jobs/store", "jobs/record"))}
        for frame in {f.rsplit(":", 1)[0] + ")" for f in mine}:
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    lines = [f"py-spy, scheduler main thread: busy {total / (rate * seconds):.0%} of {seconds} s; inclusive time:", ""]
    lines += [f"- {n / total:.0%} {frame}" for frame, n in sorted(inclusive.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(lines)
