"""JobStore: every read and state change of job records in Redis.

Writes go through the Lua scripts in `jobs.scripts`, so each change is atomic and leaves
an event in the job's history; reads build `JobRecord`s. Daemons use this; the CLI never
does (it talks to the scheduler's API).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from jobs import keys, scripts
from jobs.record import JobRecord
from jobs.spec import JobSpec
from jobs.states import FINAL_STATES, JobState, sources_of


class TransitionRefused(RuntimeError):
    """The job was not in a state (or attempt) from which the change is allowed."""

    def __init__(self, job_id: int, target: JobState, current: str) -> None:
        super().__init__(f"job {job_id}: cannot go to {target.value} from {current}")
        self.job_id = job_id
        self.current = current


class TooManyWaiting(RuntimeError):
    """The user already has `max_pending_per_user` PENDING/HELD jobs; nothing was stored."""


@dataclass(frozen=True)
class Transition:
    """One requested state change; see `JobStore.transition_args`."""

    job_id: int
    target: JobState
    fields: Mapping[str, Any]
    expect: frozenset[JobState] | None = None
    reservation: dict[str, Any] | None = None  # set the ledger entry
    release: bool = False  # delete the ledger entry (always done for final states)
    lease_ttl_s: float | None = None
    lease_node: str = ""
    drop_lease: bool = False
    wake: bool = True
    guard: tuple[str, str] | None = None
    detail: str = ""


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._submit = client.register_script(scripts.SUBMIT)
        self._transition = client.register_script(scripts.TRANSITION)
        self._renew = client.register_script(scripts.RENEW_LEASES)

    # ---- writes -------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, user: str, uid: int, max_waiting: int | None = None) -> int:
        now = time.time()
        state = JobState.HELD if spec.hold else JobState.PENDING
        fields = {
            "spec": json.dumps(spec.to_json()),
            "state": state.value,
            "reason": "Held" if spec.hold else "",
            "user": user,
            "uid": str(uid),
            "submitted_at": repr(now),
            "attempt": "0",
        }
        job_id = self._submit(
            keys=[keys.NEXT_JOB_ID, keys.PENDING, keys.WAKE, keys.EVENTS],
            args=[json.dumps(fields), repr(now), keys.PREFIX, "" if max_waiting is None else str(max_waiting)],
        )
        if int(job_id) < 0:
            raise TooManyWaiting(user)
        return int(job_id)

    def transition_args(self, t: Transition) -> tuple[list[str], list[str]]:
        """Keys and args of the TRANSITION script, so dispatch can queue it inside MULTI."""
        allowed = sources_of(t.target) if t.expect is None else (t.expect & sources_of(t.target))
        ledger_op = ""
        if t.release or t.target in FINAL_STATES:
            ledger_op = "del"
        elif t.reservation is not None:
            ledger_op = json.dumps(t.reservation)
        lease_op = ""
        if t.drop_lease or t.target in FINAL_STATES or t.target in (JobState.PENDING, JobState.HELD):
            lease_op = "del"
        elif t.lease_ttl_s is not None:
            lease_op = str(int(t.lease_ttl_s * 1000))
        job_keys = [
            keys.job(t.job_id),
            keys.job_events(t.job_id),
            keys.PENDING,
            keys.ACTIVE,
            keys.FINISHED,
            keys.LEDGER,
            keys.lease(t.job_id),
            keys.WAKE,
            keys.EVENTS,
        ]
        args = [
            str(t.job_id),
            ",".join(sorted(s.value for s in allowed)),
            t.target.value,
            repr(time.time()),
            json.dumps({k: _field(v) for k, v in t.fields.items()}),
            ledger_op,
            lease_op,
            t.lease_node,
            "1" if t.wake else "0",
            t.guard[0] if t.guard else "",
            t.guard[1] if t.guard else "",
            t.detail,
        ]
        return job_keys, args

    def transition(self, t: Transition, client: Any = None) -> str:
        """Apply one transition; return the state it left. Raise TransitionRefused otherwise."""
        job_keys, args = self.transition_args(t)
        ok, previous = self._transition(keys=job_keys, args=args, client=client)
        previous = previous.decode() if isinstance(previous, bytes) else str(previous)
        if not ok:
            raise TransitionRefused(t.job_id, t.target, previous)
        return previous

    def queue_transition(self, pipe: redis.client.Pipeline, t: Transition) -> None:
        """Queue a transition inside a caller's MULTI (the caller has checked the state under WATCH)."""
        job_keys, args = self.transition_args(t)
        self._transition(keys=job_keys, args=args, client=pipe)

    def renew_leases(self, job_ids: Iterable[int], node: str, ttl_s: float) -> list[int]:
        """Renew this node's leases; return the jobs whose lease it no longer holds."""
        ids = list(job_ids)
        if not ids:
            return []
        lost = self._renew(keys=[keys.lease(j) for j in ids], args=[str(int(ttl_s * 1000)), node])
        return [ids[int(i) - 1] for i in lost]

    def wake_scheduler(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(keys.WAKE, "wake")
        pipe.ltrim(keys.WAKE, 0, 99)
        pipe.execute()

    # ---- reads --------------------------------------------------------------------------
    def get(self, job_id: int) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def get_many(self, job_ids: Iterable[int]) -> list[JobRecord]:
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return [JobRecord.from_hash(raw) for raw in pipe.execute() if raw]

    def waiting(self) -> list[JobRecord]:
        """PENDING and HELD jobs in submission order."""
        return self.get_many(int(i) for i in self.redis.zrange(keys.PENDING, 0, -1))

    def active(self) -> list[JobRecord]:
        return sorted(self.get_many(int(i) for i in self.redis.smembers(keys.ACTIVE)), key=lambda r: r.id)

    def finished(self, limit: int = 100) -> list[JobRecord]:
        ids = self.redis.zrevrange(keys.FINISHED, 0, limit - 1)
        return sorted(self.get_many(int(i) for i in ids), key=lambda r: r.id)

    def ledger(self) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.redis.hgetall(keys.LEDGER).items()}

    def history(self, job_id: int) -> list[dict[str, str]]:
        events = self.redis.xrange(keys.job_events(job_id))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in events]

    def has_lease(self, job_id: int) -> bool:
        return bool(self.redis.exists(keys.lease(job_id)))

    def wait_final(self, job_id: int, timeout_s: float) -> JobRecord | None:
        """Block until the job is final or the timeout passes; return the record then."""
        return self.wait_for(job_id, lambda r: r.is_final, timeout_s)

    def wait_for(self, job_id: int, predicate: Callable[[JobRecord], bool], timeout_s: float) -> JobRecord | None:
        """Block on the job's event stream (no polling) until `predicate(record)` holds or time is up."""
        deadline = time.monotonic() + timeout_s
        # Note the stream's end before reading the record, so no event can slip between.
        tail = self.redis.xrevrange(keys.job_events(job_id), count=1)
        last_id = tail[0][0].decode() if tail else "0-0"
        while True:
            record = self.get(job_id)
            remaining = deadline - time.monotonic()
            if record is None or predicate(record) or remaining <= 0:
                return record
            # Short blocks: below any client socket timeout, and a dropped link shows fast.
            block_ms = max(1, int(min(remaining, 2.0) * 1000))
            reply = self.redis.xread({keys.job_events(job_id): last_id}, block=block_ms)
            for _stream, entries in reply or []:
                last_id = entries[-1][0].decode()


def _field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool | int):
        return str(int(value)) if isinstance(value, bool) else str(value)
    return json.dumps(value)
