"""`GET /v1/history`: finished jobs, newest first, like Slurm's sacct.

Reads the `gpulab:finished` zset (score = ended_at) in bounded batches, so filtering by user
or state never loads the whole history at once.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from jobs import keys
from jobs.api import ApiError
from jobs.record import JobRecord
from jobs.store import JobStore

if TYPE_CHECKING:
    from scheduler.service import Caller, SchedulerService

MAX_LIMIT = 10_000
MAX_SCANNED = 200_000  # records looked at per request, whatever the filters
BATCH = 500
# A query may read MAX_SCANNED records from the Redis every daemon shares: one at a time per
# user, a few in all, so one user's loop of `gpulab history --user nobody` cannot slow
# scheduling for everyone.
MAX_CONCURRENT = 4
_running: Counter[int] = Counter()
_running_lock = threading.Lock()


@contextmanager
def _bounded(uid: int) -> Iterator[None]:
    with _running_lock:
        if _running[uid]:
            raise ApiError(429, "one history query at a time: your last one is still running")
        if sum(_running.values()) >= MAX_CONCURRENT:
            raise ApiError(503, "the scheduler is answering other history queries; try again shortly")
        _running[uid] += 1
    try:
        yield
    finally:
        with _running_lock:
            _running[uid] -= 1
            if _running[uid] <= 0:
                del _running[uid]


def finished_since(
    store: JobStore,
    *,
    since: float | None = None,
    user: str = "",
    states: frozenset[str] = frozenset(),
    limit: int = 100,
) -> list[JobRecord]:
    """Finished jobs that ended at or after `since`, newest first, at most `limit`."""
    low: Any = "-inf" if since is None else repr(since)
    found: list[JobRecord] = []
    offset = 0
    while len(found) < limit and offset < MAX_SCANNED:
        ids = store.redis.zrevrangebyscore(keys.FINISHED, "+inf", low, start=offset, num=BATCH)
        if not ids:
            break
        offset += len(ids)
        for record in sorted(store.get_many(int(i) for i in ids), key=lambda r: -(r.ended_at or 0)):
            if (not user or record.user == user) and (not states or record.state.value in states):
                found.append(record)
                if len(found) >= limit:
                    break
    return found


def history_view(svc: SchedulerService, caller: Caller, query: dict[str, str]) -> dict[str, Any]:
    """The route's handler: parse and check the query, answer {"jobs": [...]}."""
    since: float | None = None
    if query.get("since"):
        try:
            since = float(query["since"])
        except ValueError:
            raise ApiError(400, "'since' must be Unix seconds") from None
        if not math.isfinite(since):
            raise ApiError(400, "'since' must be Unix seconds")
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "'limit' must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"'limit' must be between 1 and {MAX_LIMIT}")
    states = frozenset(s.strip().upper() for s in query.get("state", "").split(",") if s.strip())
    unknown = states - {"COMPLETED", "FAILED", "CANCELLED"}
    if unknown:
        raise ApiError(400, f"'state' must be COMPLETED, FAILED or CANCELLED (got {sorted(unknown)[0]})")
    with _bounded(caller.uid):
        records = finished_since(svc.store, since=since, user=query.get("user", ""), states=states, limit=limit)
    return {"jobs": [r.to_json(private=svc.may_see(caller, r)) for r in records]}
