"""Fair-share usage in Redis: a hash of per-user decayed usage (byte-seconds) and the time it
was charged up to (`_at`). Each pass charges every job for the part of its run inside
(`_at`, now]: active jobs up to now, jobs that finished in the window up to their end.
So each second of each job is charged exactly once, whichever pass sees it, and a restarted
scheduler carries on from `_at`. The arithmetic is in scheduler/fairshare.py.
"""

from __future__ import annotations

import json
from collections import defaultdict

import redis

from jobs import keys
from jobs.record import JobRecord
from scheduler.policy.accounting import Reservation
from scheduler.policy.fairshare import charge, overlap_s
from scheduler.policy.inputs import charge_bytes, run_start

AT = "_at"
WRITE_EVERY_S = 1.0  # the table is rewritten at most this often
REUSE_S = 0.5  # a pass this soon after the last computation takes its answer


def _ended_charge(values: list[bytes | None], whole_gpu_bytes: int) -> tuple[str, float | None, float | None, int]:
    user, assigned, started, ended, peak, spec_json = (v.decode() if v is not None else "" for v in values)
    spec = json.loads(spec_json) if spec_json else {}
    gpus = int(spec.get("gpus", 1))
    whole = spec.get("mem_bytes") is None or bool(spec.get("exclusive"))
    per_gpu = whole_gpu_bytes if whole else int(spec["mem_bytes"])
    peak_total = sum(int(v) for v in json.loads(peak).values()) if peak else 0
    start = float(assigned) if assigned else (float(started) if started else None)
    return user, start, float(ended) if ended else None, max(gpus * per_gpu, peak_total)


def _parse_table(raw: dict[bytes, bytes]) -> tuple[dict[str, float], float | None]:
    usage = {k.decode(): float(v) for k, v in raw.items()}
    last_at = usage.pop(AT, None)
    return usage, last_at


class UsageTracker:
    def __init__(self, client: redis.Redis, half_life_s: float) -> None:
        self.redis = client
        self.half_life_s = half_life_s
        self._ended_window: float | None = None
        self._ended: dict[int, tuple[str, float | None, float | None, int]] = {}
        self._last: tuple[float, dict[str, float]] | None = None  # (when, usage): see `update`
        # job -> (record, reservation, whole-GPU bytes, start, bytes charged): the readers keep
        # unchanged records and reservations as the same objects, so a rate is computed once.
        self._rates: dict[int, tuple[JobRecord, Reservation | None, int, float | None, int]] = {}

    def read(self) -> tuple[dict[str, float], float | None]:
        return _parse_table(self.redis.hgetall(keys.FAIRSHARE))

    def update(
        self,
        now: float,
        active: list[JobRecord],
        ledger: dict[int, Reservation],
        whole_gpu_bytes: int,
        *,
        store: bool = True,
    ) -> dict[str, float]:
        """Usage as of `now` (for this pass's priorities); stored when a second or more has
        passed. `store=False` only computes it (the API's view of what the scheduler sees).
        The scheduler's passes reuse the last answer for up to REUSE_S: charging every
        active job took ~4 ms of a 1k-job pass, and usage decays over hours."""
        if store and self._last is not None and 0 <= now - self._last[0] < REUSE_S:
            return self._last[1]
        # The table and the jobs that finished lately, in one round trip (read on every pass).
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.FAIRSHARE)
        pipe.zrangebyscore(keys.FINISHED, f"({self._ended_window!r}" if self._ended_window else "-inf", "+inf")
        table, finished = pipe.execute()
        usage, last_at = _parse_table(table)
        if last_at is None:
            if store:
                self.redis.hset(keys.FAIRSHARE, AT, repr(now))
            return usage
        if now <= last_at:
            return usage
        charges: dict[str, float] = defaultdict(float)
        rates: dict[int, tuple[JobRecord, Reservation | None, int, float | None, int]] = {}
        for record in active:
            reservation = ledger.get(record.id)
            known = self._rates.get(record.id)
            if known is None or known[0] is not record or known[1] is not reservation or known[2] != whole_gpu_bytes:
                rate = charge_bytes(record, reservation, whole_gpu_bytes)
                known = (record, reservation, whole_gpu_bytes, run_start(record), rate)
            rates[record.id] = known
            start = known[3]
            if start is not None and start < now:  # overlap_s(start, now, last_at, now), inlined
                charges[record.user] += (now - max(start, last_at)) * known[4]
        if store:  # the same records and reservations next pass: their rates are not recomputed
            self._rates = rates
        for user, start, end, held in self._ended_since(last_at, whole_gpu_bytes, finished):
            seconds = overlap_s(start, end or now, last_at, now)
            if seconds > 0:
                charges[user] += seconds * held
        updated = charge(usage, last_at, now, charges, self.half_life_s)
        if store:
            self._last = (now, updated)
            if now - last_at >= WRITE_EVERY_S:
                self._store(updated, last_at, now)
        return updated

    def _ended_since(
        self, last_at: float, whole_gpu_bytes: int, finished: list[bytes]
    ) -> list[tuple[str, float | None, float | None, int]]:
        """(user, start, end, bytes) of the jobs that ended after `last_at`. A finished job's
        record no longer changes, so each is read once while its window is open. `finished`:
        the ids that ended after the window this tracker knew when they were read (read
        again here when the window moved)."""
        if self._ended_window != last_at:
            self._ended_window, self._ended = last_at, {}
            finished = self.redis.zrangebyscore(keys.FINISHED, f"({last_at!r}", "+inf")
        ids = [int(i) for i in finished]
        new = [i for i in ids if i not in self._ended]
        if new:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in new:
                pipe.hmget(keys.job(job_id), "user", "assigned_at", "started_at", "ended_at", "peak_bytes", "spec")
            for job_id, values in zip(new, pipe.execute(), strict=True):
                if values[0] is not None:
                    self._ended[job_id] = _ended_charge(values, whole_gpu_bytes)
        return [self._ended[i] for i in ids if i in self._ended]

    def _store(self, usage: dict[str, float], last_at: float, now: float) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(keys.FAIRSHARE)
                current = pipe.hget(keys.FAIRSHARE, AT)
                if current is None or float(current) != last_at:
                    return  # another scheduler charged this window meanwhile
                pipe.multi()
                pipe.delete(keys.FAIRSHARE)
                pipe.hset(keys.FAIRSHARE, mapping={**{u: repr(v) for u, v in usage.items()}, AT: repr(now)})
                pipe.execute()
            except redis.WatchError:
                pass
