"""Ships each running job's output from its log file on this node into Redis
(jobs/joblog.py), so `gpulab logs [-f]` works from every host.

One thread for all of the node's jobs. Every `log_ship_interval_s` it looks at each job's
log through an fd of its own (opened on the inode the worker created, so the job cannot
point it elsewhere), reads what is new and sends every job's news in one pipelined round
trip. The job never waits on this: it writes to its file at disk speed, and what it writes
faster than `log_rate` bytes/s (past a `log_burst`) is skipped here, oldest first, so the
newest output and the head always reach Redis and a job printing forever costs this thread
at most `log_burst` bytes of reading per tick and Redis at most `log_rate` bytes/s.
The local file stays whole on the node (`<state_dir>/logs/<id>.log`).

All of the node's jobs together ship at most `log_node_rate` bytes/s, split evenly among
the jobs with news, so a thousand-task array printing forever costs Redis no more.

When a job ends, `finish` ships the rest (its head, then its last bytes) before
the end is recorded, so a follower that sees the job final has seen its last line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import redis

from jobs.config import Config
from jobs.joblog import MAX_ENTRY_BYTES, JobLog, LogLimits

log = logging.getLogger("gpulab.worker")
TOUCH_EVERY_S = 3600.0  # a quiet running job's log keys get their retention renewed this often
FINISH_WAIT_S = 5.0  # at most this long for the last flush before a job's end is recorded
FINAL_BYTES = 256 * 1024  # a job's last flush ships at least this much of its end (the traceback)


@dataclass(frozen=True)
class Segment:
    """Read `length` bytes at file offset `at`, after `skipped` bytes not shipped."""

    at: int
    length: int
    skipped: int


def plan(pos: int, size: int, head_end: int, budget: int) -> list[Segment]:
    """What to ship from a file read up to `pos`, now `size` long, with `budget` bytes
    allowed: first whatever of the head (up to file offset `head_end`) is unshipped, then
    the newest bytes; what does not fit between them is skipped."""
    segments = []
    if pos < min(head_end, size) and budget > 0:
        n = min(head_end, size) - pos
        n = min(n, budget)
        segments.append(Segment(pos, n, 0))
        pos, budget = pos + n, budget - n
    backlog = size - pos
    if backlog > 0 and budget > 0:
        skip = max(0, backlog - budget)
        segments.append(Segment(pos + skip, backlog - skip, skip))
    return segments


@dataclass
class _Tail:
    job_id: int
    attempt: int
    fd: int
    pos: int  # next file offset to ship
    head_end: int  # file offset where this attempt's head ends
    tokens: float
    last_tick: float
    last_touch: float
    sent: int = 0  # this attempt's output Redis has taken (shipped or skipped); never goes back
    ending: bool = False
    announced: bool = False  # its meta exists in Redis (so an empty log reads as empty, not missing)
    done: threading.Event = field(default_factory=threading.Event)


class LogShipper:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self.redis = client
        self.joblog = JobLog(client)
        cfg = config.worker
        self.interval = max(0.01, cfg.log_ship_interval_s)
        self.rate = float(cfg.log_rate_bytes)
        self.burst = float(max(cfg.log_burst_bytes, MAX_ENTRY_BYTES))
        self.limits = LogLimits(cfg.log_redis_cap_bytes, cfg.log_head_bytes, cfg.log_retention_s)
        self.node_rate = float(cfg.log_node_rate_bytes)
        self.node_burst = max(self.node_rate, self.burst)
        self.node_tokens, self.node_tick = self.node_burst, time.monotonic()
        self._tails: dict[tuple[int, int], _Tail] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def add(self, job_id: int, attempt: int, fd: int, start: int) -> None:
        """Ship the job's log from file offset `start` (this attempt's first byte); takes `fd`."""
        now = time.monotonic()
        tail = _Tail(job_id, attempt, fd, start, start + self.limits.head_bytes, self.burst, now, now)
        with self._lock:
            old = self._tails.pop((job_id, attempt), None)
            self._tails[(job_id, attempt)] = tail
        if old is not None:
            self._close(old)
        self._wake.set()

    def finish(self, job_id: int, attempt: int, wait_s: float = FINISH_WAIT_S) -> None:
        """The job's attempt ended: ship what is left, then forget it. Waits (bounded) for it."""
        with self._lock:
            tail = self._tails.get((job_id, attempt))
            if tail is None:
                return
            tail.ending = True
        self._wake.set()
        tail.done.wait(wait_s)

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("worker: could not ship job output (%s); retrying", exc)
                stopping.wait(min(1.0, 10 * self.interval))
            except Exception:
                log.exception("worker: log shipping error")
                stopping.wait(1.0)
        with self._lock:
            tails, self._tails = list(self._tails.values()), {}
        for tail in tails:
            self._close(tail)

    def tick(self) -> None:
        """One look at every job's log; every append in one pipelined round trip."""
        with self._lock:
            tails = list(self._tails.values())
        now = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        sent: list[tuple[_Tail, int, int, int, int, bool]] = []  # tail, new position and count, answers, final
        # Whether each job had ended, read before its size: only a flush planned after the end
        # was announced (the job's last bytes written) is its last one. A `finish` that comes
        # while this tick is on its way leaves the tail for the next tick (it lost the job's
        # last line, written after this tick looked at the file).
        endings = {id(tail): tail.ending for tail in tails}
        sizes = {id(tail): self._size(tail) for tail in tails}
        # The node's share: however many jobs print at once, this worker reads and sends at
        # most log_node_rate bytes/s (split evenly among the jobs with news), plus final flushes.
        self.node_tokens = min(self.node_burst, self.node_tokens + (now - self.node_tick) * self.node_rate)
        self.node_tick = now
        busy = sum(1 for tail in tails if sizes[id(tail)] > tail.pos and not endings[id(tail)])
        share = self.node_tokens / max(1, busy)
        for tail in tails:
            tail.tokens = min(self.burst, tail.tokens + (now - tail.last_tick) * self.rate)
            tail.last_tick = now
            ending = endings[id(tail)]
            budget = int(max(tail.tokens, FINAL_BYTES) if ending else min(tail.tokens, share))
            size = sizes[id(tail)]
            if size < tail.pos:  # the job truncated its own log: follow it from its start
                tail.pos = 0
            first, queued, pos, shipped = len(pipe), 0, tail.pos, 0
            at = tail.sent  # the attempt's output as counted across truncations: resends are recognised
            for segment in plan(tail.pos, size, tail.head_end, budget):
                skipped, got = segment.skipped, 0
                while got < segment.length:
                    want = min(MAX_ENTRY_BYTES, segment.length - got)
                    try:
                        data = os.pread(tail.fd, want, segment.at + got)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    self.joblog.append(
                        tail.job_id, tail.attempt, data, self.limits, skipped=skipped, pipe=pipe, at=at
                    )  # fmt: skip
                    at += skipped + len(data)
                    queued += 1
                    skipped = 0
                    got += len(data)
                shipped += got
                pos = segment.at + got
                if got < segment.length:
                    break
            if not queued and not tail.announced:
                self.joblog.append(tail.job_id, tail.attempt, b"", self.limits, pipe=pipe, at=at)
                queued = 1
            tail.announced = True
            if not ending:
                self.node_tokens = max(0.0, self.node_tokens - shipped)
            if queued:
                tail.tokens = max(0.0, tail.tokens - shipped)
                tail.last_touch = now
            elif now - tail.last_touch >= TOUCH_EVERY_S:
                self.joblog.touch(pipe, tail.job_id, self.limits.retention_s)
                tail.last_touch = now
            sent.append((tail, pos, at, first, queued, ending))
        answers = pipe.execute() if len(pipe) else []
        for tail, pos, at, first, queued, ending in sent:
            stale = any(isinstance(a, int) and a < 0 for a in answers[first : first + queued])
            tail.pos, tail.sent = pos, at
            if stale or ending:
                self._forget(tail)

    @staticmethod
    def _size(tail: _Tail) -> int:
        try:
            return os.fstat(tail.fd).st_size
        except OSError:
            return tail.pos

    def _forget(self, tail: _Tail) -> None:
        with self._lock:
            if self._tails.get((tail.job_id, tail.attempt)) is tail:
                del self._tails[(tail.job_id, tail.attempt)]
        self._close(tail)

    @staticmethod
    def _close(tail: _Tail) -> None:
        with contextlib.suppress(OSError):
            os.close(tail.fd)
        tail.done.set()
