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
from jobs.store import JobStore
from scheduler.policy.accounting import Reservation
from scheduler.policy.fairshare import charge, overlap_s
from scheduler.policy.inputs import charge_bytes, run_start

AT = "_at"
ENDED_FIELDS = ("user", "attempt", "assigned_at", "started_at", "ended_at", "peak_bytes")
WRITE_EVERY_S = 1.0  # the table is rewritten at most this often
REUSE_S = 0.5  # a pass this soon after the last computation takes its answer


# A finished job as charging needs it: (user, start, end, GPUs, bytes per GPU or None for
# whole GPUs, peak total); what it held depends on the size of a whole GPU then (`_held`).
Ended = tuple[str, float | None, float | None, int, int | None, int]


def _ended(values: list[bytes | None]) -> Ended:
    user, assigned, started, ended, peak, spec_json = (v.decode() if v is not None else "" for v in values)
    spec = json.loads(spec_json) if spec_json else {}
    whole = spec.get("mem_bytes") is None or bool(spec.get("exclusive"))
    peak_total = sum(int(v) for v in json.loads(peak).values()) if peak else 0
    start = float(assigned) if assigned else (float(started) if started else None)
    per_gpu = None if whole else int(spec["mem_bytes"])
    return user, start, float(ended) if ended else None, int(spec.get("gpus", 1)), per_gpu, peak_total


def _held(job: Ended, whole_gpu_bytes: int) -> int:
    """Bytes a finished job is charged for: its request (a whole GPU's size) or its peak."""
    gpus, per_gpu, peak_total = job[3], job[4], job[5]
    return max(gpus * (whole_gpu_bytes if per_gpu is None else per_gpu), peak_total)


def _parse_table(raw: dict[bytes, bytes]) -> tuple[dict[str, float], float | None]:
    usage = {k.decode(): float(v) for k, v in raw.items()}
    last_at = usage.pop(AT, None)
    return usage, last_at


class UsageTracker:
    def __init__(self, client: redis.Redis, half_life_s: float) -> None:
        self.redis = client
        self.store = JobStore(client)
        self.half_life_s = half_life_s
        # The jobs that finished after `_ended_window` (a finished job's hash no longer
        # changes), each read once: id -> (its score in FINISHED, what charging needs).
        self._ended_window: float | None = None
        self._ended: dict[int, tuple[float, Ended]] = {}
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
        if self._ended_window is not None:  # most likely still at most the table's `_at`
            pipe.zrangebyscore(keys.FINISHED, f"({self._ended_window!r}", "+inf", withscores=True)
        table, *finished = pipe.execute()
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
        for job in self._ended_since(last_at, finished[0] if finished else None, store):
            user, start, end = job[:3]
            seconds = overlap_s(start, end or now, last_at, now)
            if seconds > 0:
                charges[user] += seconds * _held(job, whole_gpu_bytes)
        if store:  # the same records and reservations next pass: their rates are not recomputed
            self._rates = rates  # (after the ended jobs: those that were active are found in the last ones)
        updated = charge(usage, last_at, now, charges, self.half_life_s)
        if store:
            self._last = (now, updated)
            if now - last_at >= WRITE_EVERY_S:
                self._store(updated, last_at, now)
        return updated

    def _ended_since(self, last_at: float, finished: list[tuple[bytes, float]] | None, store: bool) -> list[Ended]:
        """The jobs that ended after `last_at`. `finished`: the (id, end) of those that ended
        after `_ended_window`, read with the table; read again here when that is not at most
        `last_at` (first call; another scheduler's older table). Each job's hash is read once
        while it stays in the window - the window moves every second, and reading every job
        of it again then made those passes the slowest (JSON specs parsed again each time);
        a job whose end changed (it finished again) is read again."""
        if finished is None or self._ended_window is None or self._ended_window > last_at:
            finished = self.redis.zrangebyscore(keys.FINISHED, f"({last_at!r}", "+inf", withscores=True)
        ids = [(int(i), score) for i, score in finished if score > last_at]
        known = self._ended
        new = [i for i, score in ids if i not in known or known[i][0] != score]
        fresh = self._read_ended(new) if new else {}
        out = []
        kept: dict[int, tuple[float, Ended]] = {}
        for job_id, score in ids:
            entry = (score, fresh[job_id]) if job_id in fresh else known.get(job_id)
            if entry is not None and entry[0] == score:
                kept[job_id] = entry
                out.append(entry[1])
        if store:  # the next window starts here (`store=False` only computes: the API's view)
            self._ended_window, self._ended = last_at, kept
        return out

    def _read_ended(self, ids: list[int]) -> dict[int, Ended]:
        """What charging needs of these finished jobs. A job this tracker charged while it was
        active (`_rates`, the last computation's) has its spec there, parsed: only the fields
        that move are read, for all of them in one script call; the others (and any that ran
        another attempt since) are read whole, spec included."""
        out: dict[int, Ended] = {}
        seen = [i for i in ids if i in self._rates]
        for job_id, row in zip(seen, self.store.job_fields(seen, ENDED_FIELDS), strict=True):
            record = self._rates[job_id][0]
            user, attempt, assigned, started, ended, peak = row
            if user is None or attempt != str(record.attempt):
                continue  # gone, or another attempt (its spec may have been rewritten): read whole
            spec = record.spec
            out[job_id] = (
                user,
                float(assigned) if assigned else (float(started) if started else None),
                float(ended) if ended else None,
                spec.gpus,
                None if spec.mem_bytes is None or spec.exclusive else spec.mem_bytes,
                sum(int(v) for v in json.loads(peak).values()) if peak else 0,
            )
        whole = [i for i in ids if i not in out]
        if whole:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in whole:
                pipe.hmget(keys.job(job_id), "user", "assigned_at", "started_at", "ended_at", "peak_bytes", "spec")
            out.update(
                (i, _ended(values)) for i, values in zip(whole, pipe.execute(), strict=True) if values[0] is not None
            )
        return out

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
