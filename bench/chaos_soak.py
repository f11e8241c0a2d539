"""Chaos soak: thousands of short `--requeue` jobs while workers are killed (SIGKILL), frozen
(SIGSTOP past their lease, then SIGCONT) and Redis is killed and restarted from its AOF.

Every job appends `start`, `tick` (every 20 ms) and `end` lines, with the attempt and a
monotonic timestamp, to one marker file (O_APPEND, lines below PIPE_BUF: atomic). At the end:

- lost: jobs not COMPLETED;
- overlapping: jobs whose attempts ran at the same time (a tick of one attempt after the
  start of the next) - must be 0;
- ended twice: jobs that ran to their end twice, because the end happened while their
  worker was dead or frozen, so it could not be recorded, and the job (`--requeue`) was run
  again - the documented at-least-once window on node loss;
- the invariants of docs/ARCHITECTURE.md (ledger = live reservations; leases of live jobs).

    python -m bench soak [--jobs 2000] [--workers 2] [--chaos-every 2.0] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import redis

from jobs.invariants import violations
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
JOB = r"""
import os, sys, time
path, job, attempt = sys.argv[1], os.environ["GPULAB_JOB_ID"], os.environ["GPULAB_ATTEMPT"]
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def mark(what):
    os.write(fd, f"{what} {job} {attempt} {time.monotonic():.6f}\n".encode())
mark("start")
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    mark("tick")
    time.sleep(0.02)
mark("end")
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--job-seconds", type=float, default=0.3)
    p.add_argument("--chaos-every", type=float, default=2.0, help="seconds between faults")
    p.add_argument("--lease", type=float, default=3.0, help="[worker] lease_ttl_s")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="300 jobs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.port = _free_port()
        self.redis_dir = root / "redis"
        self.redis_dir.mkdir()
        self.server = RedisServer(self.redis_dir, port=self.port)
        self.markers = root / "markers"
        config = root / "config.toml"
        config.write_text(
            "[scheduler]\nhousekeeping_interval_s = 0.5\nassign_timeout_s = 10\nmax_requeues = 1000\n"
            "max_pending_per_user = 100000\n\n[policy]\nmax_array_size = 10000\n\n"
            f"[worker]\nheartbeat_interval_s = 0.2\nlease_ttl_s = {args.lease}\nkill_grace_s = 1\n"
        )
        self.env = dict(
            os.environ,
            GPULAB_STATE_DIR=str(root / "state"),
            GPULAB_REDIS_URL=f"redis://127.0.0.1:{self.port}/0",
            GPULAB_CONFIG=str(config),
            PYTHONPATH=str(ROOT),
        )
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.faults: dict[str, int] = defaultdict(int)

    def daemon(self, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{'-'.join(argv)}.log", "ab")  # noqa: SIM115  # the child keeps it
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *argv], env=self.env, cwd=self.root, stdout=log, stderr=log
        )

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.daemon("worker", "--name", name, "--sim-gpus", "1x80GiB")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def run(self) -> str:
        args = self.args
        rng = random.Random(args.seed)
        self.server.start()
        (self.root / "state").mkdir()
        self.scheduler = self.daemon("scheduler")
        for n in range(args.workers):
            self.start_worker(f"n{n}")
        _wait_socket(self.root / "state" / "gpulab.sock")
        started = time.monotonic()
        array = subprocess.run(
            [sys.executable, "-m", "cli", "submit", "--array", f"0-{args.jobs - 1}", "--requeue", "--mem", "2GiB",
             "--", sys.executable, "-c", JOB, str(self.markers), str(args.job_seconds)],
            env=self.env, cwd=self.root, capture_output=True, text=True, check=True,
        )  # fmt: skip
        first = int(array.stdout.strip())
        ids = list(range(first, first + args.jobs))
        deadline = started + 60 + args.jobs * 0.2
        while time.monotonic() < deadline:
            time.sleep(args.chaos_every)
            try:
                done = _count_final(self.client(), ids)
            except redis.RedisError:
                done = 0
            if done == len(ids):
                break
            self.fault(rng)
        elapsed = time.monotonic() - started
        for proc in self.workers.values():
            _cont(proc)
        return self.report(ids, elapsed)

    def fault(self, rng: random.Random) -> None:
        kind = rng.choice(["kill-worker", "freeze-worker", "restart-redis"])
        self.faults[kind] += 1
        name = rng.choice(sorted(self.workers))
        proc = self.workers[name]
        if kind == "kill-worker":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.start_worker(name)
        elif kind == "freeze-worker":
            proc.send_signal(signal.SIGSTOP)
            time.sleep(self.args.lease + 1.0)  # past its lease: its jobs are reaped meanwhile
            proc.send_signal(signal.SIGCONT)
        else:
            self.server.stop(kill=True)  # SIGKILL: no clean shutdown, the AOF as it was
            self.server.start()  # from the same AOF

    def report(self, ids: list[int], elapsed: float) -> str:
        client = self.client()
        records = {r.id: r for r in JobStore(client).get_many(ids)}
        lost = [i for i in ids if records.get(i) is None or records[i].state != JobState.COMPLETED]
        twice, overlapping = _check_markers(self.markers, records)
        problems = violations(client)
        attempts = sum(r.attempt for r in records.values())
        lines = [
            "| jobs | faults | wall | attempts | lost | overlapping attempts | ended twice | invariant violations |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {len(ids)} | {', '.join(f'{k} {v}' for k, v in sorted(self.faults.items()))} | {elapsed:.0f} s "
            f"| {attempts} | {len(lost)} | {len(overlapping)} | {len(twice)} | {len(problems)} |",
        ]
        if lost:
            why = [f"{i} {r.state.value} {r.reason} {r.detail}" for i in lost[:10] if (r := records.get(i))]
            lines.append("\nlost: " + "; ".join(why))
        if twice or overlapping:
            lines.append(f"\noverlapping: {overlapping[:20]}; ended twice: {twice[:20]}")
        lines += [f"\n{p}" for p in problems]
        return "\n".join(lines)

    def stop(self) -> None:
        for proc in [*self.workers.values(), *([self.scheduler] if self.scheduler else [])]:
            _cont(proc)
            proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers.values(), *([self.scheduler] if self.scheduler else [])]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.server.stop()


def _cont(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)


def _wait_socket(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no scheduler socket at {path}")
        time.sleep(0.05)


def _count_final(client: redis.Redis, ids: list[int]) -> int:
    records = JobStore(client).get_many(ids)
    return sum(1 for r in records if r.is_final)


def _check_markers(path: Path, records: dict[int, JobRecord]) -> tuple[list[int], list[int]]:
    """Jobs with more than one `end`; jobs where one attempt ticked after the next started."""
    ends: dict[int, int] = defaultdict(int)
    spans: dict[tuple[int, int], list[float]] = defaultdict(list)
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) != 4:
            continue
        what, job, attempt, at = parts[0], int(parts[1]), int(parts[2]), float(parts[3])
        if what == "end":
            ends[job] += 1
        spans[(job, attempt)].append(at)
    twice = sorted(j for j, n in ends.items() if n > 1)
    overlapping = []
    by_job: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    for (job, attempt), times in spans.items():
        by_job[job].append((attempt, min(times), max(times)))
    for job, attempts in by_job.items():
        attempts.sort()
        if any(later[1] < earlier[2] for earlier, later in pairwise(attempts)):
            overlapping.append(job)
    return twice, sorted(overlapping)


def run(args: argparse.Namespace) -> str:
    if args.quick:
        args.jobs = min(args.jobs, 300)
    with tempfile.TemporaryDirectory(prefix="gpulab-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            text = soak.run()
        finally:
            soak.stop()
    command = f"python -m bench soak --jobs {args.jobs} --workers {args.workers} --chaos-every {args.chaos_every}"
    out = f"Chaos soak (`{command} --seed {args.seed}`)\n\n{text}"
    print(out)
    return out
