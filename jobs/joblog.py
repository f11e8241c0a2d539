"""A job's output in Redis, so `gpulab logs [-f]` works from any host.

The job writes its stdout+stderr to a file on its node (its own fd: no gpulab process sits
in its write path, so a job that prints fast is never slowed by gpulab). The node's worker
tails that file and appends what is new here (worker/logship.py); the scheduler's API reads
it back by byte offset, from whichever host it runs on.

One Redis stream per job (`keys.job_log`): an entry's id is `<offset>-1`, where offset is the
byte position of its first byte in the job's output, counted across attempts; its field `d`
holds the bytes. A hash beside it (`keys.job_log_meta`) counts the bytes seen, kept and
dropped. Job output is hostile, so everything is bounded:

- per job at most `cap` bytes are kept: the first `head` bytes (how it started) and the
  newest of the rest (how it ends); the oldest bytes past the head are trimmed;
- the worker ships at most `rate` bytes/s per job (with a burst); past that it skips the
  older part of what is waiting and keeps the newest: a job writing forever costs Redis at
  most `rate` bytes/s and `cap` bytes;
- both keys expire `retention` after the last byte shipped.

A reader asking for bytes that were not kept gets the next kept ones and how many it
missed (`LogChunk.skipped`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from jobs import keys, scripts
from jobs.redis_conn import queue_script

MAX_ENTRY_BYTES = 64 * 1024  # one stream entry; the trim loop copies at most this per entry
MAX_READ_BYTES = 256 * 1024  # one API answer


@dataclass(frozen=True)
class LogLimits:
    cap_bytes: int
    head_bytes: int
    retention_s: float


@dataclass(frozen=True)
class LogChunk:
    """Bytes of a job's output from `start`; `skipped` bytes before them (from the offset
    asked for) were not kept; `end` is the offset after the last byte the log has seen."""

    start: int
    data: bytes
    skipped: int
    end: int

    @property
    def next_offset(self) -> int:
        return self.start + len(self.data)


class JobLog:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._append = client.register_script(scripts.LOG_APPEND)
        self._read = client.register_script(scripts.LOG_READ)

    def append(
        self,
        job_id: int,
        attempt: int,
        data: bytes,
        limits: LogLimits,
        *,
        skipped: int = 0,
        pipe: Any = None,
        at: int | None = None,
    ) -> Any:
        """Append `data` (after `skipped` bytes that were not shipped). With `pipe`, queued
        there (the shipper sends every job's news in one round trip). With `at`, where the
        skipped bytes begin in this attempt's output (the shipper's count, which never goes
        back): an append sent again because its answer was lost stores nothing twice. The
        answer is the new end offset, or -1 when a newer attempt already ships (this one is
        stale)."""
        log_keys = [keys.job_log(job_id), keys.job_log_meta(job_id)]
        args = [attempt, skipped, data, limits.cap_bytes, limits.head_bytes, int(limits.retention_s * 1000)]
        if at is not None:
            args.append(at)
        if pipe is not None:
            return queue_script(pipe, self._append, log_keys, args)
        return self._append(keys=log_keys, args=args)

    def touch(self, pipe: Any, job_id: int, retention_s: float) -> None:
        """Keep a running job's log alive however long it stays quiet."""
        for key in (keys.job_log(job_id), keys.job_log_meta(job_id)):
            pipe.pexpire(key, int(retention_s * 1000))

    def exists(self, job_id: int) -> bool:
        return bool(self.redis.exists(keys.job_log_meta(job_id)))

    def read(self, job_id: int, offset: int, max_bytes: int = MAX_READ_BYTES) -> LogChunk:
        """Up to `max_bytes` contiguous bytes from `offset` (or from the next kept byte)."""
        reply = self._read(keys=[keys.job_log(job_id), keys.job_log_meta(job_id)], args=[offset, max_bytes])
        end, start = int(reply[0]), int(reply[1])
        data = b"".join(reply[2:])
        if start < 0:  # nothing kept at or after offset
            start = max(offset, end)
        return LogChunk(start=start, data=data, skipped=max(0, start - offset), end=end)

    def events_seen(self, job_id: int) -> bytes:
        """The id of the job's newest history event: note it before reading, then `wait`."""
        events = self.redis.xrevrange(keys.job_events(job_id), count=1)
        return bytes(events[0][0]) if events else b"0-0"

    def wait(self, job_id: int, offset: int, last_event: bytes, timeout_s: float) -> None:
        """Block until bytes at or past `offset` arrive, the job has an event after
        `last_event` (a state change), or time is up."""
        self.redis.xread(
            {keys.job_log(job_id): f"{offset}-0", keys.job_events(job_id): last_event},
            block=max(1, int(timeout_s * 1000)),
            count=1,
        )


def utf8_cut(data: bytes, final: bool) -> int:
    """How many bytes of `data` to hand out now so a multi-byte character is never split
    across two answers (it would show as two replacement characters). Binary output that
    never completes a character is handed out anyway once nothing else is left."""
    if final or not data:
        return len(data)
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: everything up to here is whole
            return len(data)
        if byte >= 0xF8:  # never part of UTF-8: binary output, nothing to wait for
            return len(data)
        if byte >= 0xC0:  # the lead byte of the last character
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            cut = len(data) if back >= need else len(data) - back
            return cut if cut > 0 else len(data)
    return len(data)
