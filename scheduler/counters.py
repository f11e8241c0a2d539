"""Prometheus counters that never go down: folded from the global transition stream
(`keys.EVENTS`) into one Redis hash (`keys.METRIC_COUNTERS`), so they survive scheduler
restarts and are the same for every API front that serves /metrics.

A fold reads the stream from the hash's cursor, adds up what the new entries mean (jobs
finished by state and reason, starts, requeues, the queue wait of first starts in cumulative
histogram buckets) and applies it with the new cursor in one script that refuses if the
cursor moved meanwhile (another folder got there first: nothing is counted twice). The
scheduler folds every few seconds, and /metrics folds before it answers, so the counts are
current at each scrape and no entry is trimmed from the capped stream before it was counted.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import redis

from jobs import keys, scripts
from jobs.store import JobStore

WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
FOLD_BATCH = 5000
FOLD_EVERY_S = 5.0
_FINAL = ("COMPLETED", "FAILED", "CANCELLED")
_ACTIVE = ("ASSIGNED", "RUNNING")


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class MetricCounters:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.store = JobStore(client)
        self._fold = client.register_script(scripts.FOLD_COUNTERS)
        self._last_fold = 0.0

    def maybe_fold(self) -> None:
        """The scheduler loop's call: fold at most every FOLD_EVERY_S seconds."""
        now = time.monotonic()
        if now - self._last_fold >= FOLD_EVERY_S:
            self._last_fold = now
            self.fold()

    def fold(self) -> int:
        """Count every stream entry since the cursor; return how many were counted."""
        counted = 0
        while True:
            cursor = _text(self.redis.hget(keys.METRIC_COUNTERS, "_cursor"))
            entries = self.redis.xrange(keys.EVENTS, min=f"({cursor}" if cursor else "-", count=FOLD_BATCH)
            if not entries:
                return counted
            increments = self._increments([(_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in entries])
            new_cursor = _text(entries[-1][0])
            if not self._fold(keys=[keys.METRIC_COUNTERS], args=[cursor, new_cursor, json.dumps(increments)]):
                continue  # another folder moved the cursor: read again from where it left it
            counted += len(entries)
            if len(entries) < FOLD_BATCH:
                return counted

    def _increments(self, entries: list[tuple[str, dict[str, str]]]) -> dict[str, float]:
        out: Counter[str] = Counter()
        started: list[tuple[int, float]] = []
        for _id, e in entries:
            state, source = e.get("state", ""), e.get("from", "")
            if state in _FINAL:
                out[f"finished:{state}:{e.get('reason', '')}"] += 1
            elif state == "RUNNING":
                out["started"] += 1
                if e.get("job", "").isdigit():
                    started.append((int(e["job"]), float(e.get("at") or 0)))
            elif state in ("PENDING", "HELD") and source in _ACTIVE:
                out["requeued"] += 1
        # Queue wait: submit -> start of a job's first attempt.
        rows = self.store.job_fields([j for j, _ in started], ("submitted_at", "attempt")) if started else []
        waits: Counter[str] = Counter()
        sum_s = 0.0
        for (_job, at), (submitted, attempt) in zip(started, rows, strict=True):
            if submitted is None or (attempt and int(attempt) > 1):
                continue
            wait = max(0.0, at - float(submitted))
            for bound in WAIT_BUCKETS:
                if wait <= bound:
                    waits[f"wait_le:{bound!r}"] += 1
            waits["wait_count"] += 1
            sum_s += wait
        out.update(waits)
        return {**{k: float(v) for k, v in out.items()}, **({"wait_sum": sum_s} if sum_s else {})}

    def read(self) -> dict[str, float]:
        raw = self.redis.hgetall(keys.METRIC_COUNTERS)
        return {_text(k): float(v) for k, v in raw.items() if _text(k) != "_cursor"}
