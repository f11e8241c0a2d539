"""The worker's journal of job ends that Redis has not accepted yet.

A job's end (finished, failed, requeued, launch failure after the start) is known only to
its worker. When Redis cannot take it (down, MISCONF, READONLY...), losing it would let the
lease lapse and the job be run again or declared lost although it finished. So every end is
first written here (0600, written atomically, fsynced), then applied; it leaves the journal
once Redis has accepted or refused the transition (a refusal means someone else decided:
done). A background thread retries what is left, and a restarted worker replays the folder,
with its new fencing token, before taking launches.

Ends that come together (an array draining) are committed together: the threads recording
them at the same time share one journal file (one fsync for all) and one Redis round trip
(each end still its own guarded transition); each returns only once its end is durable and
applied or left to the retries. A file goes once every end in it is decided.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
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
        self._names = itertools.count()

    def write(self, entries: list[Entry]) -> str:
        """One file holding `entries`, durable when this returns; its name. Atomically (temp
        file, fsync, rename, fsync the folder): a crash leaves the file whole or none of it."""
        name = f"ends-{time.time_ns()}-{os.getpid()}-{next(self._names)}.json"
        data = json.dumps([entry.to_json() for entry in entries]).encode()
        path = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sync_folder()
        return name

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / name)

    def entries(self) -> list[tuple[str, Entry]]:
        """What a previous run left, oldest first, each with the file it is in (one end, or a
        batch of them); an unreadable file is logged and dropped."""
        found = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                data = json.loads(path.read_bytes())
                found += [(path.name, Entry.from_json(item)) for item in (data if isinstance(data, list) else [data])]
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
    """Records job ends through the journal: `record` journals and applies (ends recorded at
    the same time share one journal write and one round trip); what Redis could not take is
    retried with backoff by `run` (a thread) until it is accepted or refused."""

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
        self._file: dict[str, str] = {}  # entry name -> the journal file holding it
        self._left: dict[str, set[str]] = {}  # journal file -> its entries not decided yet
        self._lock = threading.Lock()
        self._applying = threading.Lock()  # one writer at a time: an end is applied once
        self._wake = threading.Event()
        # Group commit: the first thread to record becomes the committer of every end queued
        # until it starts; the others wait for their end's answer (or commit the next group).
        self._group = threading.Condition()
        self._queue: list[Entry] = []
        self._committing = False
        self._answers: dict[int, bool] = {}  # id(entry) -> decided

    def record(self, entry: Entry) -> bool:
        """Journal the end, then apply it; True if Redis has decided (accepted or refused).
        Returns only once the end is durable (journaled) and applied or left to retries."""
        with self._group:
            self._queue.append(entry)
            while id(entry) not in self._answers:
                if not self._committing:
                    batch, self._queue = self._queue, []
                    self._committing = True
                    break
                self._group.wait()
            else:
                return self._answers.pop(id(entry))
        answers: dict[int, bool] = {}
        try:
            answers = self._commit(batch)
        finally:
            with self._group:
                self._committing = False
                for other in batch:
                    if other is not entry:  # (one whose commit failed on an error is pending: retried)
                        self._answers[id(other)] = answers.get(id(other), False)
                self._group.notify_all()
            if not all(answers.get(id(e), False) for e in batch):
                self._wake.set()
        return answers.get(id(entry), False)

    def _commit(self, batch: list[Entry]) -> dict[int, bool]:
        name: str | None = None
        try:
            name = self.journal.write(batch)
        except OSError as exc:  # a full disk must not stop the end from being recorded now
            jobs = ", ".join(str(e.transition.job_id) for e in batch)
            log.error("worker: cannot journal the end of job(s) %s: %s", jobs, exc)
        with self._lock:
            for entry in batch:
                self._track(entry, name)
        return self._apply_many(batch)

    def replay(self) -> None:
        """A previous run's ends, applied with this worker's token (before any launch)."""
        found = self.journal.entries()
        with self._lock:
            for name, entry in found:
                log.warning("worker: replaying the journaled end of job %s", entry.transition.job_id)
                self._track(entry, name)
        self._apply_many([entry for _, entry in found])

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
        self._apply_many(entries)

    def _track(self, entry: Entry, name: str | None) -> None:
        """(Under _lock.) `entry` pending, held by journal file `name` (None: not journaled)."""
        self._forget_file(entry.name)  # an earlier copy of the same end (a replayed one)
        self._pending[entry.name] = entry
        if name is not None:
            self._file[entry.name] = name
            self._left.setdefault(name, set()).add(entry.name)

    def _forget_file(self, entry_name: str) -> None:
        """(Under _lock.) The entry leaves its journal file, which goes once none is left."""
        name = self._file.pop(entry_name, None)
        if name is None:
            return
        left = self._left.get(name, set())
        left.discard(entry_name)
        if left:
            return
        self._left.pop(name, None)
        try:
            self.journal.remove(name)
        except OSError as exc:
            log.error("worker: cannot remove journal file %s: %s", name, exc)

    def _apply_many(self, entries: list[Entry]) -> dict[int, bool]:
        """Apply the pending ones of `entries` in one round trip (each its own guarded
        transition); for each entry, whether Redis has decided."""
        answers = {id(entry): True for entry in entries}  # not pending: decided already
        if not entries:
            return answers
        with self._applying:
            with self._lock:
                todo = [e for e in entries if self._pending.get(e.name) is e]
            if not todo:
                return answers
            fence = self.fence()
            transitions = [replace(e.transition, fence=fence) for e in todo]
            outcomes: list[str | TransitionRefused | Fenced | redis.RedisError]
            try:
                outcomes = self.store.transition_each(transitions)
            except redis.RedisError as exc:
                outcomes = [exc] * len(todo)
            for entry, transition, outcome in zip(todo, transitions, outcomes, strict=True):
                answers[id(entry)] = self._settle(entry, transition, outcome)
        return answers

    def _settle(
        self, entry: Entry, transition: Transition, outcome: str | TransitionRefused | Fenced | redis.RedisError
    ) -> bool:
        """What Redis answered one end; False when it may take it later (kept for retries)."""
        job_id = transition.job_id
        if isinstance(outcome, TransitionRefused) and entry.late_ok and outcome.current == JobState.PENDING.value:
            # Its lease lapsed as it finished and the scheduler requeued this attempt:
            # record the result anyway (same attempt, not dispatched again yet).
            try:
                self.store.transition(late_finish(transition, entry.node))
                outcome = "late"
            except (TransitionRefused, Fenced, redis.RedisError) as exc:
                outcome = exc
        if isinstance(outcome, TransitionRefused):
            log.warning("worker: job %s ended but was already moved on (%s)", job_id, outcome)
        elif isinstance(outcome, Fenced):
            log.warning("worker: the end of job %s is refused: this worker was fenced", job_id)
            self.on_fenced()
        elif isinstance(outcome, redis.RedisError):
            if transient(outcome):
                log.warning("worker: cannot record the end of job %s yet (%s); journaled, retrying", job_id, outcome)
                return False
            log.error("worker: Redis refused the end of job %s; dropping it", job_id, exc_info=outcome)
        with self._lock:
            if self._pending.get(entry.name) is entry:
                del self._pending[entry.name]
                self._forget_file(entry.name)
        return True
