"""The hook for raising a notification outside a state transition (e.g. a job found idle).

Kept apart from jobs/notify.py, which is pure (the scheduler's policy imports the spec).
"""

from __future__ import annotations

import time

import redis

from jobs import keys
from jobs.notify import EVENTS


def emit(client: redis.Redis | redis.client.Pipeline, job_id: int, event: str, detail: str = "") -> None:
    """Raise `event` for a job outside a transition, e.g. `emit(r, 12, "idle", "GPU 0 idle 30 min")`.

    The notifier delivers it to the job's owner if the job asked for that event (its
    `--notify-on`, or its owner's default when it was submitted); otherwise it is dropped.
    Cheap and non-blocking: one XADD, safe inside a caller's pipeline or MULTI."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r}")
    fields = {"job": str(job_id), "event": event, "detail": detail[:500], "at": repr(time.time())}
    client.xadd(keys.NOTIFY_EVENTS, fields, maxlen=keys.NOTIFY_EVENTS_MAXLEN, approximate=True)
