"""Which jobs changed since the last pass, from the global event stream (keys.EVENTS).

Every submit and every state transition appends `job <id>` to that stream in the same
atomic script that changes the record (jobs/scripts.py), and so does a cancel request
(REQUEST_CANCEL: the active jobs' `cancel_requested` is kept), so a pass that knows
where it stopped reading can re-read only the jobs that moved instead of every waiting job.

A gap means the in-memory picture may be wrong, and the caller must read everything again:
- the stream was trimmed past where we stopped (it is capped at ~10,000 entries: more
  changes than that between two passes);
- the entry we stopped at is gone for another reason (Redis restarted from an AOF that
  lost its last second, or was flushed or replaced);
- we never read it (a new scheduler, or the first pass after an error).
`poll` reads the stream and the waiting jobs' count in one MULTI, so the caller can also
compare that count with its own when nothing changed: a cheap check that the picture it
keeps is the one in Redis.
"""

from __future__ import annotations

import redis

from jobs import keys

BATCH = 5000  # stream entries per read; a burst larger than this takes several reads


class ChangeFeed:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._last: bytes | None = None  # id of the last entry read; None = nothing known

    def mark(self) -> None:
        """Note the stream's end now, before the caller reads everything: what changes after
        this is seen by the next `poll` (a job may be read twice, never missed)."""
        tail = self.redis.xrevrange(keys.EVENTS, count=1)
        self._last = tail[0][0] if tail else None

    def forget(self) -> None:
        """Make the next poll report a gap (after an error mid-pass, say)."""
        self._last = None

    def poll(self) -> tuple[set[int] | None, int, int]:
        """(ids of the jobs with an event since the last poll or mark, or None on a gap;
        the numbers of waiting and of active jobs in Redis, read together with the first page)."""
        pipe = self.redis.pipeline(transaction=True)
        if self._last is not None:
            pipe.xrange(keys.EVENTS, self._last, "+", count=BATCH)  # inclusive: our entry must still be there
        pipe.zcard(keys.PENDING)
        pipe.scard(keys.ACTIVE)
        *read, waiting, active = pipe.execute()
        entries = read[0] if read else None
        if not entries or entries[0][0] != self._last:
            return None, int(waiting), int(active)
        changed: set[int] = set()
        while True:
            for entry_id, fields in entries[1:]:
                job = fields.get(b"job")
                if job is not None and job.isdigit():
                    changed.add(int(job))
                self._last = entry_id
            if len(entries) < BATCH:
                return changed, int(waiting), int(active)
            # The next page from the entry just read, inclusive like the first: a burst past the
            # cap between two pages (a 20k-task array is one script) may have trimmed it, and a
            # page that began after it would skip the trimmed entries unnoticed.
            entries = self.redis.xrange(keys.EVENTS, self._last, "+", count=BATCH)
            if not entries or entries[0][0] != self._last:
                return None, int(waiting), int(active)
