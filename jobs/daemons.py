"""Every live gpulab daemon (scheduler, worker) announces itself in Redis: its kind, name,
host, pid, gpulab version and its clock's offset from Redis's, renewed every few seconds
and forgotten once it stops (by Redis's clock, so no host's clock decides who is live).

Two uses:
- **Versions.** A daemon refuses to start against a Redis where a live daemon runs another
  gpulab version (one line naming it), unless told this is a rolling upgrade
  (`--allow-mixed-versions` or GPULAB_ALLOW_MIXED_VERSIONS=1; README "Upgrade").
- **`gpulab doctor`** shows every daemon's version, clock offset and when it was last seen.

And what every daemon does as it stops: `within`, its last words to Redis in bounded time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from jobs import keys, scripts
from jobs.version import gpulab_version

log = logging.getLogger("gpulab.daemons")
CHECKIN_INTERVAL_S = 2.0
TTL_S = 10.0  # not renewed for this long: not live
ALLOW_MIXED_ENV = "GPULAB_ALLOW_MIXED_VERSIONS"


class VersionMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class DaemonInfo:
    id: str
    kind: str
    name: str
    host: str
    pid: int
    version: str
    clock_offset_s: float | None  # its clock minus Redis's, measured at its last check-in
    rtt_s: float | None
    seen_at: float  # Redis time of its last check-in (s)

    @staticmethod
    def parse(daemon_id: str, raw: bytes | str | None, expires_ms: float) -> DaemonInfo:
        try:
            data: Any = json.loads(raw or "{}")
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        ttl = _number(data.get("ttl_s")) or TTL_S
        return DaemonInfo(
            id=daemon_id,
            kind=str(data.get("kind", "?")),
            name=str(data.get("name", "?")),
            host=str(data.get("host", "?")),
            pid=int(_number(data.get("pid")) or 0),
            version=str(data.get("version", "?")),
            clock_offset_s=_number(data.get("clock_offset_s")),
            rtt_s=_number(data.get("rtt_s")),
            seen_at=expires_ms / 1000 - ttl,
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) < 1e15 else None


def measure_clock(client: redis.Redis) -> tuple[float, float]:
    """This host's clock minus Redis's (seconds), and the round trip it was measured over."""
    before = time.time()
    seconds, micros = client.time()
    after = time.time()
    return (before + after) / 2 - (seconds + micros / 1e6), after - before


def allow_mixed_from_env() -> bool:
    return os.environ.get(ALLOW_MIXED_ENV, "").strip().lower() in ("1", "true", "yes")


class Presence:
    """One daemon's record in Redis. `check_in(first=True)` at start refuses a mixed version."""

    def __init__(self, client: redis.Redis, kind: str, name: str, *, allow_mixed: bool = False) -> None:
        self.redis = client
        self.kind, self.name = kind, name
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{kind}:{name}:{self.host}:{self.pid}"
        self.version = gpulab_version()
        self.allow_mixed = allow_mixed or allow_mixed_from_env()
        self._script = client.register_script(scripts.DAEMON_CHECKIN)

    def check_in(self, *, first: bool = False) -> None:
        offset, rtt = measure_clock(self.redis)
        record = {
            "kind": self.kind, "name": self.name, "host": self.host, "pid": self.pid, "version": self.version,
            "clock_offset_s": round(offset, 6), "rtt_s": round(rtt, 6), "ttl_s": TTL_S,
        }  # fmt: skip
        check = "1" if first and not self.allow_mixed else "0"
        answer = self._script(
            keys=[keys.DAEMONS, keys.DAEMON_INFO],
            args=[self.id, self.version, json.dumps(record), int(TTL_S * 1000), check],
        )
        if int(answer[0]) == 0:
            other, version = _text(answer[1]), _text(answer[2])
            raise VersionMismatch(
                f"refusing to start gpulab {self.kind} {self.version}: {other} runs gpulab {version} "
                f"on this Redis; upgrade every daemon to one version, or pass --allow-mixed-versions "
                f"(or {ALLOW_MIXED_ENV}=1) during a rolling upgrade (README, 'Upgrade')"
            )

    def run(self, stopping: threading.Event, interval_s: float = CHECKIN_INTERVAL_S) -> None:
        """Renew the record until `stopping`; Redis errors wait for the next round."""
        while not stopping.wait(interval_s):
            with contextlib.suppress(redis.RedisError):
                self.check_in()

    def start(self, stopping: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stopping,), name="presence", daemon=True)
        thread.start()
        return thread

    def leave(self) -> None:
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(keys.DAEMONS, self.id)
            pipe.hdel(keys.DAEMON_INFO, self.id)
            pipe.execute()


def live_daemons(client: redis.Redis) -> tuple[list[DaemonInfo], float]:
    """The daemons whose record has not expired, and Redis's time now (s)."""
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    entries = client.zrangebyscore(keys.DAEMONS, int(now * 1000), "+inf", withscores=True)
    ids = [_text(member) for member, _ in entries]
    raws = client.hmget(keys.DAEMON_INFO, ids) if ids else []
    daemons = [DaemonInfo.parse(i, raw, score) for i, raw, (_, score) in zip(ids, raws, entries, strict=True)]
    return sorted(daemons, key=lambda d: (d.kind, d.name, d.id)), now


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def within(calls: Sequence[Callable[[], object]], seconds: float) -> bool:
    """Run `calls` one after another on a thread of their own, waiting at most `seconds`;
    whether they all returned. For a stopping daemon's last words to Redis: cut off from it,
    each call waits out its timeout and retries (a scheduler took 34 s to stop, a worker 52 s),
    while what they say (a lease handed back, a node marked down, a presence removed) also
    expires by itself. An exception in one is logged, the next still runs."""

    def run_all() -> None:
        for call in calls:
            try:
                call()
            except Exception:
                log.exception("stopping: a last call to Redis failed")

    thread = threading.Thread(target=run_all, name="last-words", daemon=True)
    thread.start()
    thread.join(timeout=max(0.0, seconds))
    return not thread.is_alive()


class LastWords:
    """A stopping daemon's steps that talk to Redis, each bounded by `within`: `per_step`
    seconds, and once one step went unanswered only `after_silence` for each later one. Cut
    off from Redis, a worker's five steps of 3 s made a 15 s stop; an answering Redis takes
    milliseconds a step, so the short bound costs nothing when it answers."""

    def __init__(self, per_step: float, after_silence: float) -> None:
        self.per_step = per_step
        self.after_silence = after_silence
        self.unanswered = False

    def bound(self) -> float:
        return self.after_silence if self.unanswered else self.per_step

    def say(self, calls: Sequence[Callable[[], object]]) -> bool:
        answered = within(calls, self.bound())
        self.unanswered = self.unanswered or not answered
        return answered


class StopSignals:
    """SIGTERM and SIGINT stop a daemon: install it on the main thread, then `wait` there.

    The handler takes no lock: it only notes the signal, and the wakeup fd wakes `wait`,
    which sets `stop` itself. A handler runs on the main thread between two of its
    bytecodes; one that set `stop` (an Event, a lock inside) while the main thread was inside
    `stop.wait` holding that lock waited for it forever: a scheduler ignored its SIGTERM for
    60 s in a suite run (tests/unit/test_stop_signals.py). A second signal changes nothing."""

    POLL_S = 0.25  # `stop` set by another thread (a loop that failed) is seen within this

    def __init__(self, stop: threading.Event, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.stop = stop
        self.received: int | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum

    def wait(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for a stop (a signal, or `stop` set by another
        thread); whether stopping. After a signal `stop` is set."""
        deadline = time.monotonic() + timeout
        while True:
            if self.received is not None:
                self.stop.set()  # here, on the main thread's own path: never inside stop.wait
            if self.stop.is_set():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self._read], [], [], min(remaining, self.POLL_S))
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 512):  # drain the wakeup bytes
                    pass
