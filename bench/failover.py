"""Leader failover: several `gpulab scheduler`s on one Redis (own state dirs and sockets, as on
separate hosts) and a simulated worker; the leader is killed with -9, again and again.

For each kill: a job is submitted through a surviving scheduler's socket right after the
kill, and the time from the kill to that job's ASSIGNED (the new leader's first dispatch,
seen on the job's event stream) is measured. The killed scheduler is restarted before the
next round, so every round has the same number of schedulers.

    python -m bench failover [--kills 10] [--schedulers 2] [--lease 3.0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bench.latency import Daemon, free_port
from cli.client import ApiClient
from jobs import keys
from jobs.invariants import violations
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kills", type=int, default=10, help="how many times the leader is killed")
    p.add_argument("--schedulers", type=int, default=2, help="schedulers on the one Redis")
    p.add_argument("--lease", type=float, default=3.0, help="[scheduler] leader_lease_s")
    p.add_argument("--quick", action="store_true", help="3 kills")


def _env(root: Path, name: str, url: str) -> dict[str, str]:
    state = root / name
    state.mkdir(exist_ok=True)
    return dict(
        os.environ,
        GPULAB_STATE_DIR=str(state),
        GPULAB_REDIS_URL=url,
        GPULAB_CONFIG=str(root / "config.toml"),
        PYTHONPATH=str(ROOT),
    )


def _leader_pid(client: redis.Redis) -> int | None:
    if client.get(keys.LEADER) is None:
        return None
    holder = (client.hget(keys.LEADER_INFO, "holder") or b"").decode()
    pid = holder.split(" ", 1)[0].rpartition(":")[2]
    return int(pid) if pid.isdigit() else None


def _await(probe: Callable[[], int | None], timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {probe}")
        time.sleep(0.01)


def run(args: argparse.Namespace) -> str:
    kills = 3 if args.quick else args.kills
    root = Path(tempfile.mkdtemp(prefix="gpulab-failover-"))
    (root / "config.toml").write_text(f"[scheduler]\nleader_lease_s = {args.lease}\n")
    server = RedisServer(root / "redis", port=free_port())
    server.start()
    client = redis.Redis.from_url(server.url)
    store = JobStore(client)
    cli = [sys.executable, "-m", "cli"]
    schedulers: dict[str, Daemon] = {}
    daemons: list[Daemon] = []
    try:
        for n in range(args.schedulers):
            name = f"head{n}"
            schedulers[name] = Daemon([*cli, "scheduler"], _env(root, name, server.url), "scheduler ready")
        worker_env = _env(root, "gpu1", server.url)
        daemons.append(Daemon([*cli, "worker", "--name", "gpu1", "--sim-gpus", "2x24GiB"], worker_env, "worker ready"))
        spec = {"command": ["/bin/true"], "cwd": str(root), "mem_bytes": GiB, "name": "failover"}
        samples: list[float] = []
        for _ in range(kills):
            pid = _await(lambda: _leader_pid(client))
            name = next(n for n, d in schedulers.items() if d.proc.pid == pid)
            survivor = next(n for n in schedulers if n != name)
            epoch = int(client.get(keys.LEADER_EPOCH) or 0)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            schedulers[name].proc.wait()
            job_id = ApiClient(root / survivor / "gpulab.sock").submit(spec)
            record = store.wait_for(job_id, lambda r: r.state != JobState.PENDING, 60.0)
            if record is None or record.state == JobState.PENDING:
                raise RuntimeError(f"job {job_id} was never dispatched after the kill")
            samples.append(time.monotonic() - killed)
            if int(client.get(keys.LEADER_EPOCH) or 0) <= epoch:
                raise RuntimeError("the job was dispatched without a new leadership")
            print(f"kill {len(samples)}: {name} (pid {pid}) -> first dispatch after {samples[-1]:.2f} s", flush=True)
            store.wait_final(job_id, 60.0)
            schedulers[name] = Daemon([*cli, "scheduler"], _env(root, name, server.url), "scheduler ready")
        problems = violations(client)
    finally:
        for daemon in [*daemons, *schedulers.values()]:
            daemon.stop()
        client.close()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"**Leader failover** ({args.schedulers} schedulers, `leader_lease_s = {args.lease}`, {kills} kills -9 of the "
        "leader; time from the kill to the first dispatch by the new leader)",
        "",
        "| min (s) | median (s) | max (s) | invariant violations |",
        "| --- | --- | --- | --- |",
        f"| {min(samples):.2f} | {statistics.median(samples):.2f} | {max(samples):.2f} | {len(problems)} |",
    ]
    text = "\n".join(lines)
    print(text)
    return text
