"""The waiting jobs grouped by who asks and for what, each group in submission order.

A group is (user, --priority, throttled array, request shape). Within a group every job
has the same fair-share factor and priority, so its scheduling order (placement.py, `rank`)
is the order of submission: the older job has waited longer, and age only adds. Placement
therefore merges the groups' heads instead of sorting the whole queue, and once a group's
shape is known not to fit this pass it answers the rest of the group at once.

The scheduler keeps one of these across passes and adds and removes only the jobs that
changed (scheduler/daemon.py); the pure `place()` builds one per call.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator

from scheduler.policy.types import PendingJob

GroupKey = tuple[str, int, "int | None", bool, str, str, int, int]


def group_key(job: PendingJob) -> GroupKey:
    """Jobs with the same key are interchangeable to placement except for their age."""
    whole = job.mem_bytes is None or job.exclusive
    throttled_array = job.array_id if job.array_throttle else None
    return (job.user, job.priority, throttled_array, whole, job.node, job.gpu_model, job.gpus, job.mem_bytes or 0)


def _submission(job: PendingJob) -> tuple[float, int]:
    return job.submitted_at, job.id


class WaitingQueue:
    def __init__(self, jobs: Iterable[PendingJob] = ()) -> None:
        self.groups: dict[GroupKey, list[PendingJob]] = {}
        # Each group's job ids in the same order: placement answers a blocked group's tail
        # with `dict.fromkeys(ids[pos:], why)`, at C speed, not a Python loop over 10k jobs.
        self.ids: dict[GroupKey, list[int]] = {}
        self._where: dict[int, GroupKey] = {}
        self.by_id: dict[int, PendingJob] = {}  # every job in the queue (read-only to callers)
        self._users: Counter[str] = Counter()
        for job in jobs:
            self.add(job)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._where

    def __iter__(self) -> Iterator[PendingJob]:
        for group in self.groups.values():
            yield from group

    def users(self) -> set[str]:
        return set(self._users)

    def add(self, job: PendingJob) -> None:
        """Add (or replace) a job."""
        if job.id in self._where:
            self.discard(job.id)
        key = group_key(job)
        group = self.groups.setdefault(key, [])
        ids = self.ids.setdefault(key, [])
        if not group or _submission(group[-1]) < _submission(job):
            group.append(job)  # the common case: newer than everything in its group
            ids.append(job.id)
        else:
            at = bisect.bisect_right(group, _submission(job), key=_submission)
            group.insert(at, job)
            ids.insert(at, job.id)
        self._where[job.id] = key
        self.by_id[job.id] = job
        self._users[job.user] += 1

    def discard(self, job_id: int) -> None:
        key = self._where.pop(job_id, None)
        if key is None:
            return
        job = self.by_id.pop(job_id)
        group = self.groups[key]
        # The group is in submission order: find it by bisection (the jobs that leave most
        # are those that start, at a group's head; a scan from the tail cost 15 ms a pass at 100k).
        i = bisect.bisect_left(group, _submission(job), key=_submission)
        if i < len(group) and group[i].id == job_id:
            self._users[job.user] -= 1
            if not self._users[job.user]:
                del self._users[job.user]
            del group[i]
            del self.ids[key][i]
        if not group:
            del self.groups[key]
            del self.ids[key]
