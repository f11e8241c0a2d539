"""`GET /v1/jobs`: the queue, filtered in the scheduler, in the order the scheduler will
consider it, and paged through finished jobs instead of stopping at a fixed count.

Order: running and assigned jobs (by id), then PENDING jobs in scheduling order - highest
total priority first, then oldest, then lowest id, exactly `policy.placement.rank`'s key -
each with its place (`queue_position`, 1 = considered first), then HELD, then (with `all`)
finished jobs, newest first. Filters: users, states, a name pattern (shell glob). Finished
jobs come in pages of `limit` (newest first); `next_cursor` names the next page and is null
after the last. A page boundary is an offset into the finished list, so jobs that finish
while someone pages may appear twice (never go missing): clients deduplicate by id.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs import keys
from jobs.api import ApiError
from jobs.record import JobRecord
from jobs.states import ACTIVE_STATES, JobState

if TYPE_CHECKING:
    from scheduler.service import Caller, SchedulerService

DEFAULT_PAGE = 1000
MAX_PAGE = 10_000
MAX_PATTERN = 256
_STATES = {s.value for s in JobState}


@dataclass(frozen=True)
class JobQuery:
    all_jobs: bool = False
    users: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    name: str = ""
    limit: int = DEFAULT_PAGE
    cursor: int = 0

    def matches(self, record: JobRecord) -> bool:
        return (
            (not self.users or record.user in self.users)
            and (not self.states or record.state.value in self.states)
            and (not self.name or fnmatch.fnmatchcase(record.spec.display_name, self.name))
        )


def parse_query(query: dict[str, str], caller_user: str) -> JobQuery:
    """The query string of `GET /v1/jobs` (`user=a,b&me=1&state=PENDING,HELD&name=sweep*&
    all=1&limit=N&cursor=K`); one line naming the parameter when it is wrong."""
    users = {u for u in query.get("user", "").split(",") if u}
    if query.get("me") == "1":
        users.add(caller_user)
    states = {s.strip().upper() for s in query.get("state", "").split(",") if s.strip()}
    unknown = sorted(states - _STATES)
    if unknown:
        raise ApiError(400, f"'state': unknown state {unknown[0]!r}; one of {', '.join(sorted(_STATES))}")
    name = query.get("name", "")
    if len(name) > MAX_PATTERN or not name.isprintable():
        raise ApiError(400, f"'name' must be a printable pattern of at most {MAX_PATTERN} characters")
    limit, cursor = _int(query, "limit", DEFAULT_PAGE), _int(query, "cursor", 0)
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"'limit' must be between 1 and {MAX_PAGE}")
    if cursor < 0:
        raise ApiError(400, "'cursor' must be 0 or more")
    return JobQuery(query.get("all") == "1", frozenset(users), frozenset(states), name, limit, cursor)


def _int(query: dict[str, str], name: str, default: int) -> int:
    try:
        return int(query.get(name, default))
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer") from None


def _group(record: JobRecord) -> int:
    if record.state in ACTIVE_STATES:
        return 0
    return {JobState.PENDING: 1, JobState.HELD: 2}.get(record.state, 3)


def list_jobs(svc: SchedulerService, caller: Caller, q: JobQuery) -> dict[str, Any]:
    now = time.time()
    live: list[JobRecord] = []
    if q.cursor == 0:  # live jobs come once, on the first page
        live = svc.store.waiting() + svc.store.active()
    finished: list[JobRecord] = []
    next_cursor: int | None = None
    if q.all_jobs:
        ids = svc.redis.zrevrange(keys.FINISHED, q.cursor, q.cursor + q.limit - 1)
        finished = sorted(svc.store.get_many(int(i) for i in ids), key=lambda r: -r.id)
        next_cursor = q.cursor + len(ids) if len(ids) == q.limit else None
    parts = svc.priority_parts(live, now)
    ranked = sorted((r for r in live if r.id in parts), key=lambda r: (-parts[r.id]["total"], r.submitted_at, r.id))
    position = {r.id: n for n, r in enumerate(ranked, 1)}  # among every pending job, before filters
    live = [r for r in live if q.matches(r)]
    live.sort(key=lambda r: (_group(r), position.get(r.id, 0), r.id))
    views = []
    for record in live + [r for r in finished if q.matches(r)]:
        view = svc.public_view(caller, record)
        if record.id in parts:
            view["priority"] = parts[record.id]
            view["queue_position"] = position[record.id]
        views.append(view)
    return {"jobs": views, "now": now, "next_cursor": next_cursor}
