"""Job ends through the worker's journal (worker/journal.py): ends recorded at the same time
share one journal file and one Redis round trip, each still durable before it is applied,
each still its own guarded transition, and a file stays until every end in it is decided."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs import keys, lifecycle
from jobs.lifecycle import Attempt, Fence
from jobs.spec import JobSpec
from jobs.states import JobState, Reason
from jobs.store import JobStore
from tests.helpers.stack import eventually
from worker.journal import EndRecorder, Entry, Journal

NODE = "ej"


class KeptJournal(Journal):
    """A real journal that also remembers which ends each file it wrote held."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.files: list[list[int]] = []

    def write(self, entries: list[Entry]) -> str:
        name = super().write(entries)
        self.files.append([e.transition.job_id for e in entries])
        return name


@pytest.fixture
def fence(redis_client: redis.Redis) -> Fence:
    return Fence(keys.node_epoch(NODE), str(redis_client.incr(keys.node_epoch(NODE))))


@contextlib.contextmanager
def refusing_writes(client: redis.Redis) -> Iterator[None]:
    """Redis refusing writes (NOREPLICAS: a primary cut off from its replicas)."""
    client.config_set("min-replicas-to-write", 1)
    try:
        yield
    finally:
        client.config_set("min-replicas-to-write", 0)


def _running(store: JobStore, fence: Fence, count: int) -> list[int]:
    ids = []
    for _ in range(count):
        job_id = store.submit(JobSpec(command=("true",), cwd="/", mem_bytes=2**20), user="u", uid=1)
        store.transition(lifecycle.assign(job_id, 1, NODE, [{"index": 0, "uuid": "GPU-x"}], {}, 30, 1.0))
        store.transition(lifecycle.start(Attempt(job_id, 1, NODE, fence), 4242, "/log", 30, 2.0))
        ids.append(job_id)
    return ids


def _end(job_id: int, fence: Fence) -> Entry:
    ending = lifecycle.finish(
        Attempt(job_id, 1, NODE, fence), JobState.COMPLETED, Reason.NONE, "", {"exit_code": 0}, time.time()
    )
    return Entry(ending, NODE, True)


def _record_together(recorder: EndRecorder, entries: list[Entry]) -> list[bool]:
    """The first end committed alone while the others queue behind it: they are committed
    together, as ends that come while one is being committed are."""
    answers: dict[int, bool] = {}

    def record(n: int) -> None:
        answers[n] = recorder.record(entries[n])

    journal = recorder.journal
    assert isinstance(journal, KeptJournal)
    threads = [threading.Thread(target=record, args=(n,)) for n in range(len(entries))]
    with recorder._applying:  # the first commit stops before Redis, once its end is journaled
        threads[0].start()
        eventually(lambda: journal.files)
        for thread in threads[1:]:
            thread.start()
        eventually(lambda: len(recorder._queue) == len(entries) - 1)
    for thread in threads:
        thread.join()
    return [answers[n] for n in range(len(entries))]


def test_ends_recorded_together_share_one_journal_write_and_are_each_applied(
    redis_client: redis.Redis, fence: Fence, tmp_path: Path
) -> None:
    store = JobStore(redis_client)
    a, b, c, moved = _running(store, fence, 4)
    store.transition(lifecycle.cancel(moved, JobState.RUNNING, "test", time.time()))  # decided elsewhere
    journal = KeptJournal(tmp_path / "journal")
    recorder = EndRecorder(store, journal, lambda: fence, lambda: None)
    answers = _record_together(recorder, [_end(j, fence) for j in (a, b, c, moved)])
    assert journal.files == [[a], [b, c, moved]]
    assert answers == [True, True, True, True]  # each decided: accepted, or refused (moved on)
    assert [store.raw_state(j) for j in (a, b, c, moved)] == [JobState.COMPLETED] * 3 + [JobState.CANCELLED]
    assert list(journal.folder.iterdir()) == [] and recorder.pending_jobs() == []


def test_ends_redis_cannot_take_stay_journaled_until_a_restart_records_them(
    redis_client: redis.Redis, fence: Fence, tmp_path: Path
) -> None:
    """Durable before applied: while Redis refuses writes, the ends of a shared commit are on
    disk; the next worker of the node replays them (with its own token) and records each."""
    store = JobStore(redis_client)
    ids = _running(store, fence, 3)
    journal = KeptJournal(tmp_path / "journal")
    recorder = EndRecorder(store, journal, lambda: fence, lambda: None)
    with refusing_writes(redis_client):
        assert _record_together(recorder, [_end(j, fence) for j in ids]) == [False, False, False]
    assert journal.files == [ids[:1], ids[1:]]
    on_disk = sorted(
        entry["job_id"] for path in journal.folder.glob("*.json") for entry in json.loads(path.read_bytes())
    )
    assert on_disk == ids and sorted(recorder.pending_jobs()) == ids
    assert [store.raw_state(j) for j in ids] == [JobState.RUNNING] * 3

    successor = Fence(fence.key, str(redis_client.incr(fence.key)))  # the node's next worker
    EndRecorder(store, Journal(journal.folder), lambda: successor, lambda: None).replay()
    assert [store.raw_state(j) for j in ids] == [JobState.COMPLETED] * 3
    assert list(journal.folder.iterdir()) == []
