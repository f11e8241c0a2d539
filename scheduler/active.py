"""The active jobs (ASSIGNED and RUNNING) as each pass needs them, read cheaply.

Like scheduler/pending.py: each record is parsed once (its spec and user never change)
and then refreshed from the few fields the scheduler uses, read for every active job in
one script call per page together with whether its lease still exists, instead of a full
record and two more commands per job. A cache: rebuilt from Redis after a restart.

`read` re-reads every active job and its lease (at start, on a gap, every resync);
between, `update` re-reads only the jobs the event stream says changed (scheduler/changes.py)
and reports every lease as held, and `lapsed` (every housekeeping interval) asks Redis
for the leases alone, so only a read or checked pass reaps.

A job the scheduler just dispatched is not parsed again: `known` (the waiting jobs' cache,
scheduler/pending.py) hands over the record it parsed while the job waited, when the active
attempt is the one after it. That is safe because a spec is rewritten only when an attempt
ends back in the waiting states (an OOM retry raises --mem), so between the waiting record
of attempt N and the active attempt N+1 there was one dispatch and no rewrite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

import redis

from jobs import keys
from jobs.record import GpuAssignment, JobRecord
from jobs.states import JobState
from jobs.store import JobStore

# `submitted_at` never changes: it tells a job from another with the same id (an id counter
# that went back with a flushed Redis, scheduler/pending.py `_instance`). Cancel stays last.
FIELDS = (
    "state", "attempt", "node", "gpus", "assigned_at", "started_at", "peak_bytes", "submitted_at", "cancel_requested",
)  # fmt: skip
_SUBMITTED = FIELDS.index("submitted_at")
ACTIVE_STATES = frozenset({JobState.ASSIGNED.value, JobState.RUNNING.value})
PAGE = 2000


@dataclass(frozen=True)
class Active:
    record: JobRecord
    has_lease: bool
    cancel_requested: bool


class ActiveReader:
    def __init__(self, client: redis.Redis, known: Callable[[int], JobRecord | None] | None = None) -> None:
        self.redis = client
        self.store = JobStore(client)
        self._known = known or (lambda _job_id: None)
        self._cache: dict[int, tuple[tuple[str | None, ...], JobRecord]] = {}
        self._active: dict[int, Active] = {}  # as of the last read or update, leases as then
        self.records: dict[int, JobRecord] = {}  # the same jobs' records (the pass reads, never writes)
        # Ids whose record came, changed or went since `take_changed`; None: any (a full read).
        self._changed: set[int] | None = None

    def take_changed(self) -> set[int] | None:
        """The ids whose active record came, changed (another object) or went since the last
        call; None when any may have (a full read since): what the pass derives from the
        active jobs is kept current with it instead of rebuilt from every job."""
        changed, self._changed = self._changed, set()
        return changed

    def update(self, changed: set[int], invalid: dict[int, str] | None = None) -> list[Active]:
        """Apply the jobs that changed since the last read; every lease counts as held."""
        ids = sorted(changed)
        rows: dict[int, tuple[str | None, ...]] = {}
        for start in range(0, len(ids), PAGE):
            page = ids[start : start + PAGE]
            for job_id, row in zip(page, self.store.job_fields(page, FIELDS), strict=True):
                if row[0] in ACTIVE_STATES:
                    rows[job_id] = row
                else:
                    self._cache.pop(job_id, None)
                    if self._active.pop(job_id, None) is not None:
                        del self.records[job_id]
                        self._note(job_id)
        parsed = self._parse_new(rows, invalid)
        for job_id, row in rows.items():
            record = self._current(job_id, row, parsed)
            if record is None:
                continue
            self._cache[job_id] = (row, record)
            self._active[job_id] = Active(record, True, row[-1] == "1")
            if self.records.get(job_id) is not record:
                self.records[job_id] = record
                self._note(job_id)
        return list(self._active.values())

    def _note(self, job_id: int) -> None:
        if self._changed is not None:
            self._changed.add(job_id)

    def _parse_new(
        self, rows: dict[int, tuple[str | None, ...]], invalid: dict[int, str] | None
    ) -> dict[int, JobRecord]:
        """Records for the jobs not cached yet: handed over from the waiting jobs' cache when
        it holds the attempt just before this one, else read and parsed."""
        out: dict[int, JobRecord] = {}
        unknown = []
        for job_id, row in rows.items():
            if self._same_job(job_id, row):
                continue
            waited = self._known(job_id)
            if (
                waited is not None
                and str(waited.attempt + 1) == row[1]
                and repr(waited.submitted_at) == row[_SUBMITTED]
            ):
                out[job_id] = waited
            else:
                unknown.append(job_id)
        out.update((r.id, r) for r in self.store.get_many(unknown, invalid))
        return out

    def _current(self, job_id: int, row: tuple[str | None, ...], parsed: dict[int, JobRecord]) -> JobRecord | None:
        """The job's record as of `row`: the cached one (refreshed when its fields changed), else
        the one just parsed; None when it could not be parsed (quarantine's business)."""
        if self._same_job(job_id, row):
            seen, record = self._cache[job_id]
            return record if row == seen else _refreshed(record, row)
        if job_id in parsed:
            return _refreshed(parsed[job_id], row)
        return None

    def _same_job(self, job_id: int, row: tuple[str | None, ...]) -> bool:
        """Whether the cached record is of the job `row` was read from (not of an older job
        that had its id before Redis was flushed or lost its last writes)."""
        entry = self._cache.get(job_id)
        return entry is not None and entry[0][_SUBMITTED] == row[_SUBMITTED]

    def lapsed(self) -> list[Active]:
        """The active jobs (as of the last read or update) whose lease no longer exists now:
        what the reaper needs, asked of Redis for the leases alone - the records are kept
        current by `update`, and `read` re-reads them whole at every resync. Only the lapsed
        ones are returned: rebuilding every active job with its lease made the passes that
        check (each housekeeping interval) the slowest of a 1k-job queue."""
        out = []
        ids = list(self._active)
        for start in range(0, len(ids), PAGE):
            page = ids[start : start + PAGE]
            gone = self.store.lapsed_leases(page)
            if gone:
                out += [replace(self._active[i], has_lease=False) for i in page if i in gone]
        return out

    def read(self, invalid: dict[int, str] | None = None) -> list[Active]:
        ids = sorted(int(i) for i in self.redis.smembers(keys.ACTIVE))
        values: dict[int, tuple[str | None, ...]] = {}
        leases: dict[int, bool] = {}
        for start in range(0, len(ids), PAGE):
            page = ids[start : start + PAGE]
            for job_id, (row, has_lease) in zip(page, self.store.job_fields_and_leases(page, FIELDS), strict=True):
                if row[0]:  # a job whose hash is gone has no state: skip it
                    values[job_id] = row
                    leases[job_id] = has_lease
        parsed = self._parse_new(values, invalid)
        cache: dict[int, tuple[tuple[str | None, ...], JobRecord]] = {}
        out = []
        for job_id, row in values.items():
            record = self._current(job_id, row, parsed)
            if record is None:
                continue
            cache[job_id] = (row, record)
            out.append(Active(record, leases[job_id], row[-1] == "1"))
        self._cache = cache
        self._active = {a.record.id: Active(a.record, True, a.cancel_requested) for a in out}
        self.records = {a.record.id: a.record for a in out}
        self._changed = None
        return out


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _refreshed(record: JobRecord, row: tuple[str | None, ...]) -> JobRecord:
    state, attempt, node, gpus, assigned_at, started_at, peak, _submitted, _cancel = row
    return record.updated(
        state=JobState(state or record.state.value),
        attempt=int(attempt or 0),
        node=node or "",
        gpus=tuple(GpuAssignment(int(g["index"]), str(g["uuid"])) for g in json.loads(gpus or "[]")),
        assigned_at=_float(assigned_at),
        started_at=_float(started_at),
        peak_bytes={k: int(v) for k, v in json.loads(peak or "{}").items()},
    )
