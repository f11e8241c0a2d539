"""JobStore: every read and state change of job records in Redis.

The only module that writes job records. Every write goes through a Lua script in
`jobs.scripts` with its keys from `jobs.keys`, so each change is atomic and leaves an event in
the job's history; what a change implies is decided in `jobs.lifecycle`. Reads build
`JobRecord`s; a record that no longer parses is reported, never raised into a daemon's loop.
Daemons use this; the CLI never does (it talks to the scheduler's API).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
from redis.exceptions import NoScriptError

from jobs import keys, scripts
from jobs.lifecycle import Fence, Transition
from jobs.profiles import Sample
from jobs.record import InvalidRecord, JobRecord, checked_status
from jobs.redis_conn import queue_script
from jobs.spec import JobSpec
from jobs.states import JobState, Reason, sources_of


class TransitionRefused(RuntimeError):
    """The job was not in a state (or attempt) from which the change is allowed."""

    def __init__(self, job_id: int, target: JobState, current: str) -> None:
        super().__init__(f"job {job_id}: cannot go to {target.value} from {current}")
        self.job_id = job_id
        self.current = current


class IdTaken(RuntimeError):
    """A reserved id names a job that exists (the id counter went back): nothing was stored."""


class TooManyWaiting(RuntimeError):
    """The user already has `max_pending_per_user` PENDING/HELD jobs; nothing was stored."""


class TooMuchStored(RuntimeError):
    """The user's PENDING/HELD jobs would hold more than `max_stored_per_user` bytes of specs;
    nothing was stored."""


class Fenced(RuntimeError):
    """This worker's fencing token is stale: another worker holds its node name now."""


HASHES_PAGE = 1000  # records per JOB_HASHES call: keeps each call short for Redis's other clients
# TRANSITION's keys (1-based) that every job shares, and those of its own (TRANSITION_MANY).
SHARED_KEYS = (3, 4, 5, 6, 8, 9, 10, 14, 15)
OWN_KEYS = (1, 2, 7, 11, 12, 13)


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._submit = client.register_script(scripts.SUBMIT)
        self._transition = client.register_script(scripts.TRANSITION)
        self._renew = client.register_script(scripts.RENEW_LEASES)
        self._fields = client.register_script(scripts.JOB_FIELDS)
        self._lapsed = client.register_script(scripts.LAPSED_LEASES)
        self._hashes = client.register_script(scripts.JOB_HASHES)
        self._observe = client.register_script(scripts.OBSERVE)
        self._profile_add = client.register_script(scripts.PROFILE_ADD)
        self._running_event = client.register_script(scripts.RUNNING_EVENT)
        self._request_preempt = client.register_script(scripts.REQUEST_PREEMPT)
        self._request_cancel = client.register_script(scripts.REQUEST_CANCEL)

    # ---- writes -------------------------------------------------------------------------
    def reserve_ids(self, count: int) -> int:
        """Reserve `count` consecutive job ids; return the first (array tasks know their ids)."""
        return int(self.redis.incrby(keys.NEXT_JOB_ID, count)) - count + 1

    def submit(
        self, spec: JobSpec, *, user: str, uid: int, max_waiting: int | None = None, max_bytes: int | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> int:  # fmt: skip
        # Both caps are checked again atomically below; checking first spares an id.
        if max_waiting is not None and self.waiting_count(user) >= max_waiting:
            raise TooManyWaiting(user)
        if max_bytes is not None and self.waiting_bytes(user) + spec_size(spec) > max_bytes:
            raise TooMuchStored(user)
        first = self.reserve_ids(1)
        self.submit_reserved(
            first, [spec], user=user, uid=uid, max_waiting=max_waiting, max_bytes=max_bytes, extra=extra
        )
        return first

    def submit_reserved(
        self,
        first: int,
        specs: list[JobSpec],
        *,
        user: str,
        uid: int,
        max_waiting: int | None = None,
        array_indexes: list[int] | None = None,
        max_bytes: int | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> list[int]:
        """Store jobs `first`, `first + 1`, ... all at once (an array's tasks appear together).
        Raise TooManyWaiting (nothing stored) past the user's `max_waiting` PENDING/HELD jobs,
        TooMuchStored past `max_bytes` bytes of their specs."""
        now = repr(time.time())
        records = []
        for offset, spec in enumerate(specs):
            fields = {
                "id": str(first + offset),
                "spec": spec_json(spec),
                "state": (JobState.HELD if spec.hold else JobState.PENDING).value,
                "reason": Reason.HELD.value if spec.hold else "",
                "user": user,
                "uid": str(uid),
                "submitted_at": now,
                "attempt": "0",
                **(extra or {}),  # the scheduler's own fields (profile key, where --mem came from)
            }
            if spec.notify.wanted:  # the events the TRANSITION script raises for this job
                fields["notify"] = ",".join(spec.notify_on)
            if array_indexes is not None:
                fields |= {
                    "array_id": str(first),
                    "array_index": str(array_indexes[offset]),
                    "array_size": str(len(array_indexes)),
                }
            records.append(fields)
        ids = [first + n for n in range(len(specs))]
        job_keys = [k for job_id in ids for k in (keys.job(job_id), keys.job_events(job_id))]
        stored = self._submit(
            keys=[keys.PENDING, keys.WAKE, keys.EVENTS, keys.WAITING_COUNT, keys.WAITING_BYTES, *job_keys],
            args=[
                now,
                json.dumps(records),
                "" if max_waiting is None else str(max_waiting),
                "" if max_bytes is None else str(max_bytes),
            ],
        )
        if int(stored) == -3:
            raise IdTaken(f"job id {first} is another job's already ({keys.NEXT_JOB_ID} went back); nothing stored")
        if int(stored) == -2:
            raise TooMuchStored(user)
        if int(stored) < 0:
            raise TooManyWaiting(user)
        return ids

    def waiting_count(self, user: str) -> int:
        """The user's PENDING and HELD jobs (what max_pending_per_user caps)."""
        return int(self.redis.hget(keys.WAITING_COUNT, user) or 0)

    def waiting_bytes(self, user: str) -> int:
        """Bytes of the specs of the user's PENDING and HELD jobs (what max_stored_per_user caps)."""
        return int(self.redis.hget(keys.WAITING_BYTES, user) or 0)

    def transition_args(self, t: Transition) -> tuple[list[str], list[str]]:
        """Keys and args of the TRANSITION script, so dispatch can queue it inside MULTI."""
        allowed = sources_of(t.target) if t.expect is None else (t.expect & sources_of(t.target))
        ledger_op = ""
        if t.leaves_node:
            ledger_op = "del"  # requeue, hold and every end give the reservation back
        elif t.reservation is not None:
            ledger_op = json.dumps(t.reservation)
        lease_op = ""
        if t.leaves_node:
            lease_op = "del"
        elif t.lease_ttl_s is not None:
            lease_op = str(int(t.lease_ttl_s * 1000))
        fence = t.fence or Fence(keys.job(t.job_id), "")  # unused key when there is no token
        launch_queue = keys.rq_queue(t.launch_queue) if t.launch_queue else keys.job(t.job_id)
        launch_job = keys.rq_job(t.launch_id) if t.launch_id else keys.job(t.job_id)
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
            keys.WAITING_COUNT,
            fence.key,
            launch_queue,
            launch_job,
            keys.WAITING_BYTES,
            keys.NOTIFY_EVENTS,
        ]
        args = [
            str(t.job_id),
            ",".join(sorted(s.value for s in allowed)),
            t.target.value,
            repr(time.time()),
            json.dumps({k: _field(v) for k, v in _checked(t.writes()).items()}),
            ledger_op,
            lease_op,
            t.lease_node,
            "1" if t.wake else "0",
            t.guard[0] if t.guard else "",
            t.guard[1] if t.guard else "",
            t.detail,
            fence.token,
            t.launch_id if t.launch_queue else "",
        ]
        return job_keys, args

    def transition(self, t: Transition, client: Any = None) -> str:
        """Apply one transition; return the state it left. Raise TransitionRefused otherwise."""
        job_keys, args = self.transition_args(t)
        ok, previous = self._transition(keys=job_keys, args=args, client=client)
        previous = previous.decode() if isinstance(previous, bytes) else str(previous)
        if not ok:
            if previous == "fenced":
                raise Fenced(f"job {t.job_id}: this worker's token for its node is stale")
            if self._resent(t, previous):
                return self._source(t, previous)
            raise TransitionRefused(t.job_id, t.target, previous)
        return previous

    def _resent(self, t: Transition, current: str) -> bool:
        """Whether a refused guarded transition (a worker's: start, finish) was refused only
        because an earlier send of this very call was applied: its answer was lost (a call
        that timed out while Redis stalled, which redis-py sent again, and Redis ran both).
        Told by the record: in the target state, with the guard and every field this
        transition writes (a start's pid and time, an end's time). Taken for a refusal, a
        start was withdrawn: nothing ran, and the RUNNING job's lease lapsed into NodeLost."""
        if current != t.target.value or t.guard is None:
            return False
        fields = {k: _field(v) for k, v in _checked(t.writes()).items()}
        names = ["state", t.guard[0], *fields]
        values = self.redis.hmget(keys.job(t.job_id), names)
        now = [v.decode() if isinstance(v, bytes) else "" for v in values]
        wanted = [t.target.value, t.guard[1], *fields.values()]
        return now == wanted

    @staticmethod
    def _source(t: Transition, current: str) -> str:
        """The state a transition applied by an earlier send left: its only allowed source."""
        sources = sorted(s.value for s in (t.expect or ()))
        return sources[0] if len(sources) == 1 else current

    def queue_transition(self, pipe: redis.client.Pipeline, t: Transition) -> None:
        """Queue a transition inside a caller's MULTI (the caller has checked the state under WATCH)."""
        job_keys, args = self.transition_args(t)
        queue_script(pipe, self._transition, job_keys, args)

    def queue_transitions(self, pipe: redis.client.Pipeline, transitions: list[Transition]) -> None:
        """`queue_transition` for a batch as ONE command (the TRANSITION_MANY script): each is
        applied as TRANSITION applies it, in order. Its reply is one TRANSITION reply per
        transition. Dispatch queues a pass's assignments this way inside its MULTI."""
        if not transitions:
            return
        all_keys: list[bytes] = []
        all_args: list[bytes] = []
        shared: list[str] | None = None
        for t in transitions:
            job_keys, args = self.transition_args(t)
            if shared is None:
                shared = [job_keys[i - 1] for i in SHARED_KEYS]
                all_keys += [k.encode() for k in shared]
            assert [job_keys[i - 1] for i in SHARED_KEYS] == shared  # the same for every job
            all_keys += [job_keys[i - 1].encode() for i in OWN_KEYS]
            all_args += [a.encode() for a in args]
        # EVAL with the script's text, not EVALSHA: a registered script queued on a pipeline
        # makes redis-py send SCRIPT EXISTS first, one more round trip before every dispatch
        # (Redis caches the compiled script by its hash; the text costs a few KiB on the wire).
        # Shared keys once and bytes, not str: redis-py packs each argument in Python, and a
        # 130-job dispatch spent half its time there.
        pipe.eval(scripts.TRANSITION_MANY, len(all_keys), *all_keys, *all_args)

    def transition_many(self, transitions: list[Transition]) -> list[str | TransitionRefused]:
        """Apply many independent transitions in one round trip (one pipeline, no MULTI: each
        is its own atomic script call, as with `transition`). For each, in order: the state it
        left, or the TransitionRefused saying why not (bulk cancel/hold/release)."""
        if not transitions:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for t in transitions:
            self.queue_transition(pipe, t)
        out: list[str | TransitionRefused] = []
        for t, reply in zip(transitions, pipe.execute(), strict=True):
            ok, previous = reply
            previous = previous.decode() if isinstance(previous, bytes) else str(previous)
            out.append(previous if ok else TransitionRefused(t.job_id, t.target, previous))
        return out

    def transition_each(
        self, transitions: list[Transition]
    ) -> list[str | TransitionRefused | Fenced | redis.RedisError]:
        """Apply independent transitions in one round trip: each is its own TRANSITION call,
        checked and applied exactly as `transition` applies it (state, guard, fencing token),
        and one refused or failed does not touch the others. For each, in order: the state it
        left, or why not (TransitionRefused, Fenced, or the Redis error of that one call).
        Raises RedisError when the round trip itself fails: then any of them may have been
        applied, as with a `transition` whose reply was lost. (A worker starts a batch of
        launches this way: worker/daemon.py WorkerDaemon.launch_many.)"""
        calls = [self.transition_args(t) for t in transitions]
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):  # again for those Redis did not have the script for (restarted, flushed)
            pipe = self.redis.pipeline(transaction=False)
            for n in todo:
                job_keys, args = calls[n]
                # EVALSHA, not the registered script: on a pipeline that sends SCRIPT EXISTS first.
                pipe.evalsha(self._transition.sha, len(job_keys), *job_keys, *args)
            for n, reply in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                replies[n] = reply
            todo = [n for n in todo if isinstance(replies[n], NoScriptError)]
            if not todo:
                break
            self._transition.sha = self.redis.script_load(scripts.TRANSITION)
        out: list[str | TransitionRefused | Fenced | redis.RedisError] = []
        for t, reply in zip(transitions, replies, strict=True):
            if isinstance(reply, redis.RedisError):
                out.append(reply)
                continue
            ok, previous = reply
            previous = previous.decode() if isinstance(previous, bytes) else str(previous)
            if ok:
                out.append(previous)
            elif previous == "fenced":
                out.append(Fenced(f"job {t.job_id}: this worker's token for its node is stale"))
            elif self._resent(t, previous):
                out.append(self._source(t, previous))
            else:
                out.append(TransitionRefused(t.job_id, t.target, previous))
        return out

    def request_cancel_many(self, running: list[tuple[int, str, int]], by: str) -> list[bool]:
        """`request_cancel` for many (job id, node, attempt) in one round trip: for each, in
        order, whether it was asked."""
        if not running:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id, node, attempt in running:
            self._queue_cancel_request(pipe, job_id, node, attempt, by)
        return [int(done) == 1 for done in pipe.execute()]

    def renew_leases(self, job_ids: Iterable[int], node: str, ttl_s: float, fence: Fence) -> list[int]:
        """Renew this node's leases; return the jobs whose lease it no longer holds. Raise
        Fenced when the worker's token is stale (then it holds none of them)."""
        ids = list(job_ids)
        lease_keys = [keys.lease(j) for j in ids]
        lost = self._renew(keys=[fence.key, *lease_keys], args=[str(int(ttl_s * 1000)), node, fence.token])
        if isinstance(lost, int) and lost < 0:
            raise Fenced(f"node {node}: another worker holds this node name now")
        return [ids[int(i) - 1] for i in lost]

    def request_cancel(self, job_id: int, node: str, attempt: int, by: str) -> bool:
        """Mark a running attempt for cancelling and tell its worker, which stops its whole
        tree (scripts.REQUEST_CANCEL). False when that attempt no longer runs (it ended or was
        requeued meanwhile): nothing was written, the caller looks at the job again."""
        return self.request_cancel_many([(job_id, node, attempt)], by)[0]

    def _queue_cancel_request(self, pipe: redis.client.Pipeline, job_id: int, node: str, attempt: int, by: str) -> None:
        job_keys = [keys.job(job_id), keys.job_events(job_id), keys.node_control(node), keys.EVENTS]
        args = [str(attempt), f"cancel requested by {by}", repr(time.time()), str(job_id)]
        queue_script(pipe, self._request_cancel, job_keys, args)

    def add_event(self, pipe: redis.client.Pipeline, job_id: int, state: str, reason: str, detail: str) -> None:
        """An event in the job's history that is not a transition (e.g. found idle)."""
        event = {"state": state, "reason": reason, "detail": detail, "at": repr(time.time())}
        pipe.xadd(keys.job_events(job_id), event)

    def request_preempt(
        self, job_id: int, node: str, attempt: int, for_job: int, detail: str, fence: Fence | None = None
    ) -> bool:
        """Mark a running attempt for preemption and tell its worker, which stops it (SIGTERM,
        then SIGKILL after the grace period) and requeues it with reason Preempted. One script
        (scripts.REQUEST_PREEMPT): nothing happens if the attempt is no longer RUNNING. Raises
        Fenced when `fence` (the scheduler's leadership) is no longer current."""
        fence = fence or Fence(keys.job(job_id), "")  # unused key when there is no token
        done = self._request_preempt(
            keys=[keys.job(job_id), keys.job_events(job_id), keys.node_control(node), fence.key],
            args=[str(attempt), str(for_job), f"preempted {detail}", repr(time.time()), fence.token, str(job_id)],
        )
        if int(done) == -1:
            raise Fenced(f"job {job_id}: preemption refused, a newer scheduler holds {fence.key}")
        return int(done) == 1

    def queue_pending_infos(
        self,
        pipe: redis.client.Pipeline,
        infos: list[tuple[int, str, str, float | None]],
        now: str,
        fence: Fence | None = None,
    ) -> None:
        """Queue why pending jobs wait (job, reason, detail, expected start), as ONE command:
        each is written only while the job is still PENDING, since a blind write could
        overwrite a newer state's reason, and only while `fence` (the scheduler's leadership)
        is current. The reply is -1 when fenced, else how many jobs were written."""
        job_keys = [(fence.key if fence else keys.LEADER).encode()]  # unused without a token
        args = [(fence.token if fence else "").encode(), now.encode()]
        for job_id, reason, detail, est_start in infos:
            job_keys += [keys.job(job_id).encode(), keys.job_events(job_id).encode()]
            args += [reason.encode(), detail.encode(), b"" if est_start is None else repr(est_start).encode()]
        # EVAL with the text, as queue_transitions (a registered script on a pipeline costs a
        # SCRIPT EXISTS round trip first).
        pipe.eval(scripts.SET_PENDING_INFOS, len(job_keys), *job_keys, *args)

    def observe(
        self, pipe: redis.client.Pipeline, job_id: int, attempt: int, fence: Fence, observed: Mapping[str, Any]
    ) -> None:
        """Queue what a worker measured about a running attempt (see scripts.OBSERVE)."""
        fields = json.dumps({k: _field(v) for k, v in _checked(observed).items()})
        queue_script(pipe, self._observe, [keys.job(job_id), fence.key], [fence.token, str(attempt), fields])

    def running_event(self, job_id: int, attempt: int, fence: Fence, detail: str, fields: Mapping[str, Any]) -> int:
        """An event in a running attempt's history (see scripts.RUNNING_EVENT): 1 written,
        0 when that attempt no longer runs; raise Fenced when the worker's token is stale."""
        written = int(
            self._running_event(
                keys=[keys.job(job_id), keys.job_events(job_id), fence.key],
                args=[
                    fence.token,
                    str(attempt),
                    detail,
                    repr(time.time()),
                    json.dumps({k: _field(v) for k, v in fields.items()}),
                ],
            )
        )
        if written < 0:
            raise Fenced(f"job {job_id}: this worker's token for its node is stale")
        return written

    # ---- memory profiles ----------------------------------------------------------------
    def add_profile_sample(
        self, user: str, sample: Sample, digest: str, fence: Fence, *, window: int, max_profiles: int, ttl_s: int
    ) -> bool:
        """Record one finished attempt's peak in its profile (once per attempt); False if it
        was there already. Raise Fenced when the worker's token is stale."""
        added = int(
            self._profile_add(
                keys=[keys.profile(digest), keys.user_profiles(user), fence.key],
                args=[
                    fence.token,
                    json.dumps(sample.to_json()),
                    str(sample.job_id),
                    str(sample.attempt),
                    str(max(1, window)),
                    repr(sample.at),
                    str(max(1, max_profiles)),
                    digest,
                    str(max(1, ttl_s)),
                ],
            )
        )
        if added < 0:
            raise Fenced(f"job {sample.job_id}: this worker's token for its node is stale")
        return added == 1

    def profile_samples(self, digest: str) -> list[Sample]:
        """A profile's recent runs, newest first; entries that do not parse are skipped."""
        found = []
        for raw in self.redis.lrange(keys.profile(digest), 0, -1):
            try:
                sample = Sample.from_json(json.loads(raw))
            except ValueError:
                sample = None
            if sample is not None:
                found.append(sample)
        return found

    def user_profiles(self, user: str, limit: int = 1000) -> dict[str, list[Sample]]:
        """A user's profiles, most recently run first: digest -> its runs (newest first)."""
        digests = [d.decode() for d in self.redis.zrevrange(keys.user_profiles(user), 0, limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for digest in digests:
            pipe.lrange(keys.profile(digest), 0, -1)
        profiles: dict[str, list[Sample]] = {}
        for digest, raws in zip(digests, pipe.execute(), strict=True):
            samples = []
            for raw in raws:
                try:
                    sample = Sample.from_json(json.loads(raw))
                except ValueError:
                    sample = None
                if sample is not None:
                    samples.append(sample)
            if samples:
                profiles[digest] = samples
        return profiles

    def wake_scheduler(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(keys.WAKE, "wake")
        pipe.ltrim(keys.WAKE, 0, 99)
        pipe.execute()

    # ---- reads --------------------------------------------------------------------------
    def get(self, job_id: int) -> JobRecord | None:
        """The job's record; None if there is none. Raises InvalidRecord if it does not parse."""
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def get_each_and(self, job_ids: list[int], key: str) -> tuple[list[JobRecord | InvalidRecord | None], bytes | None]:
        """The records of `job_ids` in order (None where there is none, the InvalidRecord where
        one does not parse) and, in the same round trip, the value of `key` (a worker's
        fencing key, checked once for a batch of launches)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        pipe.get(key)
        *raws, value = pipe.execute()
        records: list[JobRecord | InvalidRecord | None] = []
        for raw in raws:
            try:
                records.append(JobRecord.from_hash(raw) if raw else None)
            except InvalidRecord as exc:
                records.append(exc)
        return records, value

    def get_many(self, job_ids: Iterable[int], invalid: dict[int, str] | None = None) -> list[JobRecord]:
        """The records that exist and parse; those that do not parse go into `invalid`
        (id -> why), for the scheduler to quarantine, instead of raising."""
        ids = list(job_ids)
        records = []
        for start in range(0, len(ids), HASHES_PAGE):
            page = ids[start : start + HASHES_PAGE]
            for job_id, flat in zip(page, self._hashes(keys=[keys.job(j) for j in page]), strict=True):
                if not flat:
                    continue
                try:
                    records.append(JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True))))
                except InvalidRecord as exc:
                    if invalid is not None:
                        invalid[job_id] = str(exc)
        return records

    def job_fields(self, job_ids: list[int], fields: tuple[str, ...]) -> list[tuple[str | None, ...]]:
        """The named fields of many jobs in one call (None where missing), in `job_ids` order."""
        return [row for row, _ in self._job_fields(job_ids, fields, with_lease=False)]

    def job_fields_and_leases(
        self, job_ids: list[int], fields: tuple[str, ...]
    ) -> list[tuple[tuple[str | None, ...], bool]]:
        """Like `job_fields`, with whether each job's lease exists, still in one call."""
        return self._job_fields(job_ids, fields, with_lease=True)

    def _job_fields(
        self, job_ids: list[int], fields: tuple[str, ...], *, with_lease: bool
    ) -> list[tuple[tuple[str | None, ...], bool]]:
        if not job_ids:
            return []
        job_keys = [keys.job(j) for j in job_ids]
        if with_lease:
            job_keys += [keys.lease(j) for j in job_ids]
        flat = json.loads(self._fields(keys=job_keys, args=[len(fields), "1" if with_lease else "0", *fields]))
        width = len(fields) + int(with_lease)
        rows = [flat[n * width : (n + 1) * width] for n in range(len(job_ids))]
        return [(tuple(v or None for v in row[: len(fields)]), bool(with_lease and row[-1])) for row in rows]

    def lapsed_leases(self, job_ids: list[int]) -> set[int]:
        """The jobs among `job_ids` whose lease key is gone, in one script call."""
        if not job_ids:
            return set()
        return {job_ids[int(i) - 1] for i in self._lapsed(keys=[keys.lease(j) for j in job_ids])}

    def raw_state(self, job_id: int) -> JobState | None:
        raw = self.redis.hget(keys.job(job_id), "state")
        try:
            return JobState(raw.decode()) if raw else None
        except ValueError:
            return None

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


def spec_json(spec: JobSpec) -> str:
    """The spec as stored in the record's `spec` field."""
    return json.dumps(spec.to_json())


def spec_size(spec: JobSpec) -> int:
    """Bytes the spec takes in Redis (what the per-user and per-submit byte caps count)."""
    return len(spec_json(spec))  # ensure_ascii: characters = bytes


def _checked(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    """A job-written status is bounded here, where every write passes (see checked_status),
    whatever the writer checked before."""
    if "status" not in fields or isinstance(fields["status"], str):
        return fields
    return {**fields, "status": checked_status(fields["status"])}


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
