"""The worker's journal of job ends that Redis has not accepted yet.

A job's end (finished, failed, requeued, launch failure after the start) is known only to
its worker. When Redis cannot take it (down, MISCONF, READONLY...), losing it would let the
lease lapse and the job be run again or declared lost although it finished. So every end is
first written here, one small JSON file per job attempt (0600, written atomically, fsynced),
then applied; the file is removed once Redis has accepted or refused the transition (a
refusal means someone else decided: done). A background thread retries what is left, and a
restarted worker replays the folder, with its new fencing token, before taking launches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from jobs.lifecycle import Fence, Transition, late_finish
from jobs.states import JobState
from jobs.store import Fenced, JobStore, TransitionRefused

log = logging.getLogger("gpulab.worker")


@dataclass(frozen=True)
class Entry:
    """One attempt's end: the transition (its fence is the current worker's at replay) and
    whether a job that ended on its own may still record it after a requeue (late finish)."""

    transition: Transition
    node: str
    late_ok: bool

    @property
    def name(self) -> str:
        guard = self.transition.guard[1] if self.transition.guard else "0"
        return f"{self.transition.job_id}-{guard}.json"

    def to_json(self) -> dict[str, Any]:
        t = self.transition
        return {
            "job_id": t.job_id,
            "target": t.target.value,
            "fields": dict(t.fields),
            "expect": sorted(s.value for s in t.expect) if t.expect is not None else None,
            "guard": list(t.guard) if t.guard else None,
            "detail": t.detail,
            "wake": t.wake,
            "node": self.node,
            "late_ok": self.late_ok,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        guard = data.get("guard")
        expect = data.get("expect")
        transition = Transition(
            int(data["job_id"]),
            JobState(data["target"]),
            dict(data["fields"]),
            expect=frozenset(JobState(s) for s in expect) if expect is not None else None,
            guard=(str(guard[0]), str(guard[1])) if guard else None,
            detail=str(data.get("detail", "")),
            wake=bool(data.get("wake", True)),
        )
        return cls(transition, str(data["node"]), bool(data.get("late_ok", False)))


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)

    def write(self, entry: Entry) -> None:
        """Atomically (temp file, fsync, rename, fsync the folder): a crash leaves the old
        file or the new one, never half of one."""
        data = json.dumps(entry.to_json()).encode()
        path = self.folder / entry.name
        tmp = self.folder / f".{entry.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sync_folder()

    def remove(self, entry: Entry) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / entry.name)

    def entries(self) -> list[Entry]:
        """What a previous run left, oldest first; an unreadable file is logged and dropped."""
        found = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                found.append(Entry.from_json(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("worker: dropping unreadable journal entry %s (%s)", path.name, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
        return found

    def _sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- applying ends, now or later ---------------------------------------------------------------
# Errors after which Redis may take the same write later: down, loading, refusing writes.
_TRANSIENT_REPLIES = ("MISCONF", "READONLY", "NOREPLICAS", "LOADING", "MASTERDOWN", "TRYAGAIN", "BUSY", "OOM ")


def transient(exc: redis.RedisError) -> bool:
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | redis.BusyLoadingError | redis.ReadOnlyError):
        return True
    return isinstance(exc, redis.ResponseError) and any(m in str(exc) for m in _TRANSIENT_REPLIES)


class EndRecorder:
    """Records job ends through the journal: `record` journals and applies; what Redis could
    not take is retried with backoff by `run` (a thread) until it is accepted or refused."""

    MIN_BACKOFF_S = 0.1
    MAX_BACKOFF_S = 5.0

    def __init__(
        self, store: JobStore, journal: Journal, fence: Callable[[], Fence | None], on_fenced: Callable[[], None]
    ) -> None:
        self.store = store
        self.journal = journal
        self.fence = fence
        self.on_fenced = on_fenced
        self._pending: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._applying = threading.Lock()  # one writer at a time: an end is applied once
        self._wake = threading.Event()

    def record(self, entry: Entry) -> bool:
        """Journal the end, then apply it; True if Redis has decided (accepted or refused)."""
        try:
            self.journal.write(entry)
        except OSError as exc:  # a full disk must not stop the end from being recorded now
            log.error("worker: cannot journal the end of job %s: %s", entry.transition.job_id, exc)
        with self._lock:
            self._pending[entry.name] = entry
        decided = self._apply(entry)
        if not decided:
            self._wake.set()
        return decided

    def replay(self) -> None:
        """A previous run's ends, applied with this worker's token (before any launch)."""
        for entry in self.journal.entries():
            log.warning("worker: replaying the journaled end of job %s", entry.transition.job_id)
            with self._lock:
                self._pending[entry.name] = entry
            self._apply(entry)

    def pending_jobs(self) -> list[int]:
        """Jobs whose end waits for Redis: the worker keeps their leases, they are still its."""
        with self._lock:
            return [e.transition.job_id for e in self._pending.values()]

    def wake(self) -> None:
        self._wake.set()

    def nudge(self) -> None:
        """Redis answered again (a heartbeat went through): retry now."""
        if self.pending_jobs():
            self._wake.set()

    def run(self, stopping: threading.Event) -> None:
        backoff = self.MIN_BACKOFF_S
        while not stopping.is_set():
            woken = self._wake.wait(backoff if self.pending_jobs() else 1.0)
            self._wake.clear()
            if woken:
                backoff = self.MIN_BACKOFF_S
            self.retry()
            backoff = min(backoff * 2, self.MAX_BACKOFF_S) if self.pending_jobs() else self.MIN_BACKOFF_S

    def retry(self) -> None:
        with self._lock:
            entries = list(self._pending.values())
        for entry in entries:
            if not self._apply(entry):
                return  # Redis is still away: the others would fail the same way

    def _apply(self, entry: Entry) -> bool:
        with self._applying:
            with self._lock:
                if entry.name not in self._pending:
                    return True  # another thread applied it meanwhile
            return self._apply_now(entry)

    def _apply_now(self, entry: Entry) -> bool:
        job_id = entry.transition.job_id
        transition = replace(entry.transition, fence=self.fence())
        try:
            try:
                self.store.transition(transition)
            except TransitionRefused as exc:
                if not (entry.late_ok and exc.current == JobState.PENDING.value):
                    raise
                # Its lease lapsed as it finished and the scheduler requeued this attempt:
                # record the result anyway (same attempt, not dispatched again yet).
                self.store.transition(late_finish(transition, entry.node))
        except TransitionRefused as exc:
            log.warning("worker: job %s ended but was already moved on (%s)", job_id, exc)
        except Fenced:
            log.warning("worker: the end of job %s is refused: this worker was fenced", job_id)
            self.on_fenced()
        except redis.RedisError as exc:
            if transient(exc):
                log.warning("worker: cannot record the end of job %s yet (%s); journaled, retrying", job_id, exc)
                return False
            log.exception("worker: Redis refused the end of job %s; dropping it", job_id)
        self._resolved(entry)
        return True

    def _resolved(self, entry: Entry) -> None:
        with self._lock:
            self._pending.pop(entry.name, None)
        try:
            self.journal.remove(entry)
        except OSError as exc:
            log.error("worker: cannot remove journal entry %s: %s", entry.name, exc)
