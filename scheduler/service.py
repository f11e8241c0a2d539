"""What the API does, independent of HTTP: each method takes the caller's identity and
plain values, and returns JSON-ready data or raises ApiError with one line for the user."""

from __future__ import annotations

import base64
import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

import redis

from jobs import keys, lifecycle
from jobs.api import MAX_WAIT_S, ApiError
from jobs.config import Config
from jobs.joblog import JobLog, LogChunk, utf8_cut
from jobs.record import InvalidRecord, JobRecord, public_event
from jobs.states import JobState
from jobs.store import JobStore, TransitionRefused
from scheduler.cluster import read_drained, read_heartbeats, read_ledger
from scheduler.daemon import accounting_policy
from scheduler.job_listing import JobQuery, list_jobs
from scheduler.policy.accounting import build_accounts
from scheduler.queue_view import priority_views
from scheduler.submission import Submitter, is_admin

MAX_LOG_CHUNK = 256 * 1024
MAX_LOG_OFFSET = 2**53  # past any real log; larger ones overflow seek()
MAX_LOG_WAIT_S = 10.0  # `logs -f` long-polls at most this long per request


def _read_log(path: str, offset: int) -> bytes:
    """A chunk of a job's log. The scheduler may run as root and the file belongs to the job's
    user: never follow a symlink, and read only a regular file (a FIFO or a device would block
    this thread, or hand over what is not the job's)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ApiError(409, f"{path} is not a regular file; not read")
        return os.pread(fd, MAX_LOG_CHUNK, offset)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Caller:
    uid: int
    user: str
    pid: int


class SchedulerService:
    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.redis = client
        self.store = JobStore(client)
        self.joblog = JobLog(client)
        self.policy = accounting_policy(config)
        self.submitter = Submitter(config, client, self.store, self.policy)

    # ---- jobs -------------------------------------------------------------------------------
    def submit(self, caller: Caller, body: Any) -> dict[str, Any]:
        return self.submitter.submit(caller.uid, caller.user, body)

    def list_jobs(self, caller: Caller, *, all_jobs: bool, query: JobQuery | None = None) -> dict[str, Any]:
        """The queue in scheduling order, filtered and paged (scheduler/job_listing.py)."""
        return list_jobs(self, caller, query or JobQuery(all_jobs=all_jobs))

    def priority_parts(self, records: list[JobRecord], now: float) -> dict[int, dict[str, Any]]:
        """Each pending job's priority and its parts, as the next pass computes them."""
        return priority_views(self.redis, self.config.policy, records, now)

    def public_view(self, caller: Caller, record: JobRecord) -> dict[str, Any]:
        return self._view(caller, record)

    def show(self, caller: Caller, job_id: int) -> dict[str, Any]:
        record = self._get(job_id)
        view = self._view(caller, record)
        events = self.store.history(job_id)
        view["history"] = events if self.may_see(caller, record) else [public_event(e) for e in events]
        return view

    def cancel(self, caller: Caller, job_id: int) -> dict[str, Any]:
        record = self._owned(caller, job_id, "cancel it")
        if record.is_final:
            return {"id": job_id, "state": record.state.value, "note": "already finished"}
        if record.state == JobState.RUNNING:
            # The worker owns the process: ask it to stop the whole tree; it records CANCELLED.
            if not self.store.request_cancel(job_id, record.node, record.attempt, caller.user):
                return self.cancel(caller, job_id)  # that attempt ended or was requeued meanwhile
            return {"id": job_id, "state": "CANCELLING"}
        try:
            self.store.transition(
                lifecycle.cancel(
                    job_id, record.state, f"cancelled by {caller.user}", time.time(),
                    node=record.node, attempt=record.attempt,
                )
            )  # fmt: skip
        except TransitionRefused:
            return self.cancel(caller, job_id)  # it moved (e.g. started) meanwhile: try again
        return {"id": job_id, "state": JobState.CANCELLED.value}

    def hold(self, caller: Caller, job_id: int) -> dict[str, Any]:
        self._owned(caller, job_id, "hold it")
        return self._move(lifecycle.hold(job_id, caller.user), "hold")

    def release(self, caller: Caller, job_id: int) -> dict[str, Any]:
        self._owned(caller, job_id, "release it")
        return self._move(lifecycle.release(job_id, caller.user), "release")

    def _move(self, transition: lifecycle.Transition, verb: str) -> dict[str, Any]:
        try:
            self.store.transition(transition)
        except TransitionRefused as exc:
            raise ApiError(409, f"cannot {verb} job {transition.job_id}: it is {exc.current}") from None
        return {"id": transition.job_id, "state": transition.target.value}

    def log(
        self, caller: Caller, job_id: int, offset: int, wait_s: float = 0.0, as_base64: bool = False
    ) -> dict[str, Any]:
        """Bytes of the job's output from `offset`, from Redis (shipped by its worker, so from
        any host), else from the log file if it is on this host. With `wait_s`, blocks until
        output arrives or the job changes state (`logs -f`), at most MAX_LOG_WAIT_S.
        `data` is text (bytes that are not UTF-8 read as U+FFFD, a character cut by the chunk
        waits for the next answer), or with `as_base64` the bytes as written (`logs --raw`)."""
        if not 0 <= offset <= MAX_LOG_OFFSET:
            raise ApiError(400, f"'offset' must be between 0 and {MAX_LOG_OFFSET}")
        seen = self.joblog.events_seen(job_id) if wait_s > 0 else b""  # before the reads: no change slips by
        record = self._owned(caller, job_id, "read its log")
        answer = self._log_answer(record, offset, as_base64)
        if wait_s > 0 and not answer["data"] and not answer["skipped"] and not record.is_final:
            self.joblog.wait(job_id, offset, seen, min(wait_s, MAX_LOG_WAIT_S))
            answer = self._log_answer(self._owned(caller, job_id, "read its log"), offset, as_base64)
        return answer

    def _log_answer(self, record: JobRecord, offset: int, as_base64: bool) -> dict[str, Any]:
        job_id = record.id
        chunk = self.joblog.read(job_id, offset)
        source = "redis"
        if chunk.end == 0 and not self.joblog.exists(job_id):
            chunk, source = self._log_file_chunk(record, offset), "file"
        more = chunk.next_offset < chunk.end
        cut = len(chunk.data) if as_base64 else utf8_cut(chunk.data, final=not more and record.is_final)
        data = chunk.data[:cut]
        return {
            "data": base64.b64encode(data).decode() if as_base64 else data.decode(errors="replace"),
            "start": chunk.start,
            "offset": chunk.start + cut,
            "skipped": chunk.skipped,
            "end": chunk.end,
            "more": more or cut < len(chunk.data),
            "state": record.state.value,
            "reason": record.reason,
            "detail": record.detail,
            "final": record.is_final,
            "source": source,
        }

    def _log_file_chunk(self, record: JobRecord, offset: int) -> LogChunk:
        """A job whose output is not in Redis (run by an older worker, or past
        [worker] log_retention_s): its log file, if it is on this host."""
        job_id, data = record.id, b""
        if record.log_path:
            try:
                data = _read_log(record.log_path, offset)
            except FileNotFoundError:
                if record.is_final:
                    raise ApiError(
                        404,
                        f"job {job_id}'s output is no longer in Redis ([worker] log_retention_s); "
                        f"it is on node {record.node} at {record.log_path}",
                    ) from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ApiError(409, f"job {job_id}'s log is a symlink; not followed") from None
                raise ApiError(500, f"cannot read job {job_id}'s log: {exc.strerror}") from None
        end = offset + len(data) + (1 if len(data) == MAX_LOG_CHUNK else 0)
        return LogChunk(start=offset, data=data, skipped=0, end=end)

    def wait(self, caller: Caller, job_id: int, timeout_s: float) -> dict[str, Any]:
        self._get(job_id)
        record = self.store.wait_final(job_id, min(max(timeout_s, 0.0), MAX_WAIT_S))
        assert record is not None
        return self._view(caller, record)

    # ---- GPUs ---------------------------------------------------------------------------------
    def gpus(self, caller: Caller) -> dict[str, Any]:
        beats, down = read_heartbeats(self.redis)
        drained = read_drained(self.redis)
        accounts = build_accounts(beats, read_ledger(self.redis), self.policy)
        nodes = []
        for beat in beats:
            gpus = []
            for acc in accounts[beat.node]:
                others = max(0, acc.used - acc.gpulab_used)
                gpus.append(
                    {
                        "index": acc.index,
                        "uuid": acc.uuid,
                        "name": acc.name,
                        "healthy": acc.healthy,
                        "error": acc.error,
                        "total_bytes": acc.total,
                        "used_bytes": acc.used,
                        "free_bytes": acc.nvml_free,
                        "gpulab_reserved_bytes": acc.gpulab_reserved,
                        "gpulab_used_bytes": acc.gpulab_used,
                        "others_used_bytes": others,
                        "others_peak_bytes": acc.foreign_peak,
                        "available_bytes": acc.available(self.policy),
                        "jobs": acc.jobs,
                    }
                )
            nodes.append(
                {
                    "name": beat.node,
                    "online": True,
                    "draining": beat.draining or beat.node in drained,
                    "drain_reason": drained.get(beat.node, ""),
                    "heartbeat_at": beat.sent_at,
                    "gpus": gpus,
                }
            )
        nodes += [
            {"name": n, "online": False, "draining": n in drained, "drain_reason": drained.get(n, ""), "gpus": []}
            for n in down
        ]
        return {"nodes": nodes}

    def drain(self, caller: Caller, node: str, why: str, *, resume: bool = False) -> dict[str, Any]:
        """`gpulab node drain NAME`: no new jobs there; running ones finish. Admins only."""
        if not is_admin(self.config, caller.uid, caller.user):
            raise ApiError(403, "only admins (root or [policy] admin_users) may drain or resume nodes")
        if not self.redis.sismember(keys.NODES, node):
            raise ApiError(404, f"no node named '{node}'")
        pipe = self.redis.pipeline(transaction=True)
        if resume:
            pipe.hdel(keys.DRAINED, node)
        else:
            pipe.hset(keys.DRAINED, node, f"{why or 'drained'} (by {caller.user})"[:500])
        pipe.lpush(keys.WAKE, "drain")
        pipe.execute()
        return {"node": node, "draining": not resume}

    # ---- memory profiles ------------------------------------------------------------------------
    def profiles(self, caller: Caller, user: str) -> dict[str, Any]:
        """A user's learned memory profiles (their labels quote commands: the owner's or an admin's)."""
        user = user or caller.user
        if user != caller.user and not is_admin(self.config, caller.uid, caller.user):
            raise ApiError(403, f"profiles of {user} are theirs; only they or an admin may read them")
        return {"user": user, "profiles": self.submitter.memory.list_profiles(user)}

    def preview_memory(self, caller: Caller, body: Any) -> dict[str, Any]:
        return self.submitter.memory.preview(body, caller.user)

    # ---- helpers ------------------------------------------------------------------------------
    def _get(self, job_id: int) -> JobRecord:
        try:
            record = self.store.get(job_id)
        except InvalidRecord as exc:
            raise ApiError(409, f"job {job_id}: {exc}; the scheduler quarantines it") from None
        if record is None:
            raise ApiError(404, f"no job {job_id}")
        return record

    def may_see(self, caller: Caller, record: JobRecord) -> bool:
        """The job's owner and admins may act on it and see its command, directory,
        environment names, log and status; everyone else sees what `to_json(private=False)` keeps."""
        return caller.uid == record.uid or is_admin(self.config, caller.uid, caller.user)

    def _owned(self, caller: Caller, job_id: int, verb: str) -> JobRecord:
        record = self._get(job_id)
        if not self.may_see(caller, record):
            raise ApiError(403, f"job {job_id} belongs to {record.user}; only its owner or an admin may {verb}")
        return record

    def _view(self, caller: Caller, record: JobRecord) -> dict[str, Any]:
        return record.to_json(private=self.may_see(caller, record))
