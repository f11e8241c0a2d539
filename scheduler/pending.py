"""The waiting jobs (PENDING and HELD) as each pass needs them, read cheaply.

A job's spec, user and submission time never change after submit, so each record is parsed
once and kept (a cache: rebuilt from Redis after a restart); later passes read only the
fields that do change, for thousands of jobs per script call (jobs.scripts.JOB_FIELDS),
and build a new record only for a job whose fields changed. With 10k waiting jobs this is
the difference between parsing 10k JSON specs per pass and reading one reply.

Kept current between passes (`update`): given the ids the event stream says changed
(scheduler/changes.py), only those are read again, so a pass over 10k or 100k waiting jobs
costs what changed. `read` (everything) is the full resync: on a gap in the stream, at
start, and every RESYNC_S as a check; the scheduler's own reason writes, which make no
event, are remembered here (`remember_reason`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import filterfalse, islice

import redis

from jobs import keys
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.policy.forecast import same_estimate
from scheduler.policy.types import Waiting

# The fields read again for every job that changed; `submitted_at` never changes, it tells a
# job from another one with the same id (see `_instance`).
MUTABLE = ("state", "reason", "detail", "attempt", "est_start_at", "submitted_at")
WAITING = frozenset({JobState.PENDING.value, JobState.HELD.value})
PAGE = 2000  # jobs per script call: keeps each call short for Redis's other clients
ESTIMATES_PER_PASS = 50  # estimate-only rewrites a pass makes at most (see `stale_reasons`)


class PendingReader:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.store = JobStore(client)
        self._cache: dict[int, tuple[tuple[str | None, ...], JobRecord]] = {}
        # Ids whose entry may have changed since `take_touched`; None: everything (a full read).
        self._touched: set[int] | None = None
        # Waiting jobs whose stored reason is known current (see `stale_reasons`): per
        # (reason, detail), the ids whose record says so and whose stored estimate matched
        # `_clean_starts` when last compared; `_clean_of` is the way back.
        self._clean: dict[tuple[str, str], set[int]] = {}
        self._clean_of: dict[int, tuple[str, str]] = {}
        self._clean_starts: Mapping[int, float | None] | None = None
        # Clean jobs whose forecast estimate moved, waiting (in order) to be written: see `stale_reasons`.
        self._deferred: dict[int, Waiting] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def known(self, job_id: int) -> JobRecord | None:
        """The job's record as last read while it waited (None if it was not waiting then)."""
        entry = self._cache.get(job_id)
        return entry[1] if entry is not None else None

    def take_touched(self) -> set[int] | None:
        """The ids whose entry may have changed since the last call (None: any may have, after
        a full read); the caller keeps what it derives from the waiting jobs current with it."""
        touched, self._touched = self._touched, set()
        return touched

    def ids(self) -> list[int]:
        return list(self._cache)

    def records(self) -> list[JobRecord]:
        """The waiting jobs as last read, in id order."""
        return [record for _, record in self._cache.values()]

    def update(self, changed: set[int], invalid: dict[int, str] | None = None) -> list[JobRecord]:
        """Apply the jobs that changed since the last read; return every waiting job, in id
        order. A job that left the waiting states is dropped, one that (re)entered is read whole."""
        self.apply(changed, invalid)
        return self.records()

    def apply(self, changed: set[int], invalid: dict[int, str] | None = None) -> None:
        """`update` without building the list (the scheduler's pass looks jobs up instead)."""
        if not changed:
            return
        if self._touched is not None:
            self._touched |= changed
        for job_id in changed:
            self._unclean(job_id)
        ids = sorted(changed)
        current: dict[int, tuple[str | None, ...]] = {}
        for start in range(0, len(ids), PAGE):
            page = ids[start : start + PAGE]
            for job_id, values in zip(page, self.store.job_fields(page, MUTABLE), strict=True):
                if values[0] in WAITING:
                    current[job_id] = values
                else:
                    self._cache.pop(job_id, None)  # started, ended, or gone
        cache = self._cache
        fresh = [i for i, values in current.items() if i not in cache or _instance(cache[i][0]) != _instance(values)]
        parsed = {r.id: r for r in self.store.get_many(fresh, invalid)}
        appended_before_end = False
        last = next(reversed(self._cache), 0) if self._cache else 0
        for job_id, values in current.items():
            if job_id in parsed:
                record = parsed[job_id]
                if record.state.value not in WAITING:
                    self._cache.pop(job_id, None)
                    continue
                entry = (tuple(_field(record, f) for f in MUTABLE), record)
            elif job_id in self._cache:
                seen, record = self._cache[job_id]
                entry = (values, record if values == seen else _refreshed(record, values))
            else:
                continue  # its hash went away between the two reads
            if job_id not in self._cache and job_id < last:
                appended_before_end = True
            self._cache[job_id] = entry
        if appended_before_end:  # a requeued job comes back: keep id order
            self._cache = dict(sorted(self._cache.items()))

    def stale_reasons(
        self,
        single: Mapping[int, Waiting],
        bulk: Iterable[tuple[list[int], Waiting]],
        starts: Mapping[int, float | None],
        now: float,
    ) -> list[tuple[int, Waiting, float | None]]:
        """The reasons to write, each with its start estimate (a reservation's own wins, else
        the forecast's from `starts`): those of PENDING jobs whose stored reason or detail
        differs, or whose stored estimate is not `same_estimate` as the new one. The waiting
        jobs' answers come in two parts (scheduler/policy/types.py, PlacementResult): `single`
        ones, and `bulk` runs of jobs sharing one Waiting (most of a long queue).

        What it costs follows what changed, not the queue's length: of a bulk run, the jobs
        already known clean for its text (stored, and compared against this same `starts`)
        are not looked at again; set operations find the others at C speed. A new forecast
        (another `starts`) makes the jobs whose estimate it moved unclean; a full read, all."""
        if starts is not self._clean_starts:
            before = self._clean_starts
            if before is None:
                self._clean.clear()
                self._clean_of.clear()
                self._deferred.clear()
            else:  # a new forecast: only the jobs whose estimate it moved are compared again
                for job_id in {i for i, _ in starts.items() - before.items()} | (before.keys() - starts.keys()):
                    self._unclean(job_id)
            self._clean_starts = starts
        todo: list[tuple[Iterable[int], Waiting | None]] = [(single, None)]
        for ids, why in bulk:
            clean = self._clean.get((why.reason.value, why.detail))
            todo.append((ids if clean is None else list(filterfalse(clean.__contains__, ids)), why))
        cache = self._cache
        pending = JobState.PENDING
        fields: dict[int, tuple[str, str]] = {}  # id(Waiting) -> (reason, detail)
        out: list[tuple[int, Waiting, float | None]] = []
        for members, shared in todo:
            for job_id in members:
                why = single[job_id] if shared is None else shared
                entry = cache.get(job_id)
                if entry is None:
                    continue
                record = entry[1]
                if record.state is not pending:
                    continue
                text = fields.get(id(why))
                if text is None:
                    text = fields[id(why)] = (why.reason.value, why.detail)
                old, new = record.est_start_at, why.est_start
                if new is None:
                    new = starts.get(job_id)
                if (record.reason, record.detail) != text:
                    out.append((job_id, why, new))
                elif old != new and not same_estimate(old, new, now):
                    if why.est_start is None:  # the forecast's estimate: written in turn, below
                        self._mark_clean(job_id, text)
                        self._deferred[job_id] = why
                    else:
                        out.append((job_id, why, new))
                elif why.est_start is None:  # a reservation's own estimate is compared every pass
                    self._mark_clean(job_id, text)
        # A new forecast may move the estimate of every waiting job at once: those are written
        # a bounded number per pass, oldest first, and not compared again while they wait their
        # turn (they count as clean: a new answer or record for one takes it out of the line).
        for job_id in list(islice(self._deferred, ESTIMATES_PER_PASS)):
            why = self._deferred.pop(job_id)
            entry = cache.get(job_id)
            if entry is None or entry[1].state is not pending:
                continue
            if self._clean_of.get(job_id) == (why.reason.value, why.detail):
                out.append((job_id, why, starts.get(job_id)))
        return out

    def remember_reason(self, job_id: int, reason: str, detail: str, est_start: float | None) -> None:
        """The scheduler wrote this job's reason (no event): keep the cached record in step.
        Written with the forecast's estimate (or none), it is clean for that text."""
        entry = self._cache.get(job_id)
        if entry is None:
            return
        record = entry[1].updated(reason=reason, detail=detail, est_start_at=est_start)
        self._cache[job_id] = (tuple(_field(record, f) for f in MUTABLE), record)
        self._unclean(job_id)
        starts = self._clean_starts
        if starts is not None and est_start == starts.get(job_id):
            self._mark_clean(job_id, (reason, detail))

    def _mark_clean(self, job_id: int, text: tuple[str, str]) -> None:
        self._unclean(job_id)
        self._clean.setdefault(text, set()).add(job_id)
        self._clean_of[job_id] = text

    def _unclean(self, job_id: int) -> None:
        self._deferred.pop(job_id, None)
        text = self._clean_of.pop(job_id, None)
        if text is not None:
            self._clean[text].discard(job_id)

    def read(self, invalid: dict[int, str] | None = None) -> list[JobRecord]:
        """Every PENDING and HELD job, in id (submission) order. Records that do not parse
        go into `invalid` (id -> why) for the scheduler to quarantine."""
        self._touched = None
        self._clean_starts = None  # every stored reason is compared again
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
        # A new attempt may come with a new spec (an OOM retry raises --mem), and a job id may
        # name another job now (see `_instance`): read those whole.
        stale = {
            i for i, values in current.items() if i in self._cache and _instance(self._cache[i][0]) != _instance(values)
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


_ATTEMPT, _SUBMITTED = MUTABLE.index("attempt"), MUTABLE.index("submitted_at")


def _instance(values: tuple[str | None, ...]) -> tuple[str | None, str | None]:
    """Which job and attempt a cached record stands for. The attempt alone is not enough: after
    Redis was flushed, replaced or restarted from an AOF that lost its last second, the job id
    counter starts again below ids the scheduler still remembers, and a new job 2 (attempt 0)
    was taken for the old job 2, spec and all (it waited on the old one's dependencies)."""
    return values[_ATTEMPT], values[_SUBMITTED]


def _field(record: JobRecord, name: str) -> str | None:
    value = getattr(record, name)
    if name == "state":
        return str(value.value)
    if value in (None, ""):
        return None
    return repr(value) if isinstance(value, float) else str(value)


def _refreshed(record: JobRecord, values: tuple[str | None, ...]) -> JobRecord:
    state, reason, detail, attempt, est, _submitted = (v or "" for v in values)
    return record.updated(
        state=JobState(state),
        reason=reason,
        detail=detail,
        attempt=int(attempt or 0),
        est_start_at=float(est) if est else None,
    )
