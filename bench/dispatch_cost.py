"""`python -m bench dispatch`: what one `Dispatcher.dispatch()` costs, alone.

A private redis-server; each round submits `--batch` jobs straight into the store, hands
them to `Dispatcher.dispatch()` as assignments spread over `--nodes` nodes (one RQ launch
entry per node, as a pass's batch), then runs them to COMPLETED so the active set and the
ledger stay small. Reports the wall time of the call, this process's CPU and redis-server's
CPU during it (psutil), per batch and per job; the first two rounds are warm-up.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import redis

from jobs.lifecycle import Transition
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.dispatch import Dispatcher
from scheduler.policy.accounting import GpuAccount
from scheduler.policy.types import Assignment
from scheduler.redis_server import RedisServer

GiB = 2**30
WARM_UP = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=130, help="assignments per dispatch (130: a 10k-pending pass)")
    p.add_argument("--nodes", type=int, default=64, help="nodes the batch is spread over (one RQ entry each)")
    p.add_argument("--rounds", type=int, default=30, help="dispatches measured (after 2 warm-up rounds)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gpu(node: str, index: int) -> GpuAccount:
    return GpuAccount(node, index, f"GPU-{node}-{index}", "Sim", True, 80 * GiB, 80 * GiB, 0)


def measure(client: redis.Redis, server: psutil.Process, batch: int, nodes: int, rounds: int) -> str:
    store = JobStore(client)
    dispatcher = Dispatcher(client, store, 86400.0)
    spec = JobSpec(command=("true",), cwd="/", mem_bytes=4 * GiB, env={"PATH": "/usr/bin:/bin"})
    walls, own, redis_cpu = [], [], []
    for r in range(rounds + WARM_UP):
        first = store.reserve_ids(batch)
        store.submit_reserved(first, [spec] * batch, user="bench", uid=0)
        batch_of = []
        for i in range(batch):
            node, gpu = f"n{i % nodes}", (i // nodes) % 8
            batch_of.append(Assignment(first + i, node, (_gpu(node, gpu),), {f"GPU-{node}-{gpu}": 4 * GiB}, False))
        t = server.cpu_times()
        server_before, own_before, wall_before = t.user + t.system, time.process_time(), time.perf_counter()
        written = dispatcher.dispatch(batch_of)
        wall, mine = time.perf_counter() - wall_before, time.process_time() - own_before
        t = server.cpu_times()
        if len(written) != batch:
            raise RuntimeError(f"dispatched {len(written)} of {batch}")
        if r >= WARM_UP:
            walls.append(wall)
            own.append(mine)
            redis_cpu.append(t.user + t.system - server_before)
        pipe = client.pipeline(transaction=False)
        for a in batch_of:
            now = time.time()
            store.queue_transition(pipe, Transition(a.job_id, JobState.RUNNING, {"started_at": now}, wake=False))
            store.queue_transition(pipe, Transition(a.job_id, JobState.COMPLETED, {"ended_at": now}, wake=False))
        pipe.execute()
    wall, mine, server_cpu = statistics.median(walls), statistics.mean(own), statistics.mean(redis_cpu)
    return (
        f"| {batch} | {nodes} | {rounds} | {wall * 1000:.2f} | {mine * 1000:.2f} | {server_cpu * 1000:.2f} "
        f"| {(mine + server_cpu) * 1000 / batch:.3f} |"
    )


def run(args: argparse.Namespace) -> str:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="gpulab-bench-")), port=_free_port())
    server.start()
    try:
        assert server.proc is not None
        client = redis.Redis.from_url(server.url)
        rows = [measure(client, psutil.Process(server.proc.pid), b, args.nodes, args.rounds) for b in (1, args.batch)]
        client.close()
    finally:
        server.stop()
    load = Path("/proc/loadavg").read_text().split()[0]
    text = "\n".join(
        [
            f"Dispatcher.dispatch() alone (1-minute load average at the end: {load})\n",
            "| batch | nodes | rounds | p50 wall ms | own CPU ms (mean) | redis-server CPU ms | CPU ms per job |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(text)
    return text
