"""The waiting jobs (PENDING and HELD) as each pass needs them, read cheaply.

A job's spec, user and submission time never change after submit, so each record is parsed
once and kept (a cache: rebuilt from Redis after a restart); later passes read only the
fields that do change, for thousands of jobs per script call (jobs.scripts.JOB_FIELDS),
and build a new record only for a job whose fields changed. With 10k waiting jobs this is
the difference between parsing 10k JSON specs per pass and reading one reply.
"""

from __future__ import annotations

from dataclasses import replace

import redis

from jobs import keys
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import JobStore

MUTABLE = ("state", "reason", "detail", "attempt", "est_start_at")
PAGE = 2000  # jobs per script call: keeps each call short for Redis's other clients


class PendingReader:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.store = JobStore(client)
        self._cache: dict[int, tuple[tuple[str | None, ...], JobRecord]] = {}

    def read(self, invalid: dict[int, str] | None = None) -> list[JobRecord]:
        """Every PENDING and HELD job, in id (submission) order. Records that do not parse
        go into `invalid` (id -> why) for the scheduler to quarantine."""
        current: dict[int, tuple[str | None, ...]] = {}
        after = 0
        while True:
            ids = [int(i) for i in self.redis.zrangebyscore(keys.PENDING, f"({after}", "+inf", start=0, num=PAGE)]
            for job_id, values in zip(ids, self.store.job_fields(ids, MUTABLE), strict=True):
                if values[0]:  # a job whose hash is gone has no state: skip it
                    current[job_id] = values
            if len(ids) < PAGE:
                break
            after = ids[-1]
        # A new attempt may come with a new spec (an OOM retry raises --mem): read it whole.
        stale = {
            i for i, values in current.items() if i in self._cache and _attempt(self._cache[i][0]) != _attempt(values)
        }
        for job_id in stale:
            del self._cache[job_id]
        parsed = {r.id: r for r in self.store.get_many((i for i in current if i not in self._cache), invalid)}
        cache: dict[int, tuple[tuple[str | None, ...], JobRecord]] = {}
        for job_id, values in current.items():
            if job_id in self._cache:
                seen, record = self._cache[job_id]
                cache[job_id] = (values, record if values == seen else _refreshed(record, values))
            elif job_id in parsed:
                record = parsed[job_id]  # read a moment later: keep its own fields
                cache[job_id] = (tuple(_field(record, f) for f in MUTABLE), record)
        self._cache = cache
        return [record for _, record in cache.values()]


def _attempt(values: tuple[str | None, ...]) -> str | None:
    return values[MUTABLE.index("attempt")]


def _field(record: JobRecord, name: str) -> str | None:
    value = getattr(record, name)
    if name == "state":
        return str(value.value)
    if value in (None, ""):
        return None
    return repr(value) if isinstance(value, float) else str(value)


def _refreshed(record: JobRecord, values: tuple[str | None, ...]) -> JobRecord:
    state, reason, detail, attempt, est = (v or "" for v in values)
    return replace(
        record,
        state=JobState(state),
        reason=reason,
        detail=detail,
        attempt=int(attempt or 0),
        est_start_at=float(est) if est else None,
    )
