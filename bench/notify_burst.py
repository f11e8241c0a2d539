"""Notifications under a burst: N jobs of one user end at once (and the same spread over many
users). Measures the notifier alone, on its own redis-server, against a local HTTP receiver:

- intake: the N events (raised as the TRANSITION script raises them) into the outbox;
- Redis bytes per queued delivery (INFO used_memory before and after the intake);
- send: until the receiver has every event, with the rate limit off (the notifier's own
  throughput) - with the defaults the schedule is max_per_minute batches of max_batch a minute;
- POSTs made (batching) and events received more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from jobs import keys
from jobs.config import Config, NotifyConfig
from jobs.notify_events import emit
from jobs.spec import JobSpec
from jobs.store import JobStore
from scheduler.notify.notifier import Notifier
from scheduler.redis_server import RedisServer


class _Counter:
    def __init__(self) -> None:
        self.posts = 0
        self.ids: list[str] = []
        self.lock = threading.Lock()


def _receiver(counter: _Counter) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with counter.lock:
                counter.posts += 1
                counter.ids += [e["id"] for e in body["events"]]
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=10_000, help="jobs ending at once")
    p.add_argument("--users", type=int, default=1, help="spread over this many users")


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", port=_free_port())
        server.start()
        try:
            return _measure(redis.Redis.from_url(server.url), args.events, args.users)
        finally:
            server.stop()


def _measure(client: redis.Redis, n: int, users: int) -> str:
    counter = _Counter()
    http = _receiver(counter)
    url = f"http://127.0.0.1:{http.server_address[1]}/hook"
    store = JobStore(client)
    spec = JobSpec(command=("true",), cwd="/", notify_url=url, notify_on=("end",))
    ids: list[int] = []
    per_user = n // users
    for u in range(users):
        for start in range(0, per_user, 1000):
            count = min(1000, per_user - start)
            ids += store.submit_reserved(store.reserve_ids(count), [spec] * count, user=f"u{u}", uid=os.getuid())
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        emit(pipe, job_id, "end")
    pipe.execute()
    notify = NotifyConfig(allow_networks=("127.0.0.0/8",), max_per_minute=0)
    notifier = Notifier(Config(notify=notify), client, consumer="bench")
    before = int(client.info("memory")["used_memory"])
    t0 = time.perf_counter()
    while notifier.intake_once(block_ms=1):
        pass
    intake_s = time.perf_counter() - t0
    after = int(client.info("memory")["used_memory"])
    queued = sum(int(v) for v in client.hvals(keys.NOTIFY_QUEUED))
    t0 = time.perf_counter()
    while len(set(counter.ids)) < len(ids) and time.perf_counter() - t0 < 600:
        notifier.send_once()
    send_s = time.perf_counter() - t0
    http.shutdown()
    unique = len(set(counter.ids))
    default_minutes = per_user / (NotifyConfig().max_batch * NotifyConfig().max_per_minute)
    return "\n".join(
        [
            f"{len(ids)} jobs of {users} user(s) ending at once, one webhook each (python -m bench notify "
            f"--events {n} --users {users})",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| intake into the outbox | {intake_s:.2f} s ({len(ids) / intake_s:.0f} events/s) |",
            f"| deliveries queued | {queued} |",
            f"| Redis used_memory per queued delivery | {(after - before) / max(1, queued):.0f} bytes |",
            f"| send, rate limit off | {send_s:.2f} s ({unique / max(send_s, 1e-9):.0f} events/s) |",
            f"| POSTs made | {counter.posts} (max_batch {notify.max_batch}) |",
            f"| events received / unique | {len(counter.ids)} / {unique} |",
            f"| with the default rate limit | {default_minutes:.1f} min per user for {per_user} events |",
        ]
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
