"""Reads the states of pending jobs' dependencies from Redis for the pure `evaluate`
(scheduler/policy/dependencies.py), remembering the ones that are final."""

from __future__ import annotations

from collections.abc import Iterable

import redis

from jobs import keys
from jobs.record import JobRecord
from jobs.states import FINAL_STATES
from scheduler.policy.dependencies import dependency_ids

_FINAL = frozenset(s.value for s in FINAL_STATES)


class DependencyReader:
    """States of the jobs that waiting jobs depend on. Final states never change, so they
    are remembered; others are read again each pass (one pipeline)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._final: dict[int, tuple[str, ...]] = {}

    def forget(self) -> None:
        """Drop what is remembered (at every full read): a job id names another job once Redis
        was flushed, replaced or lost its last writes, and an ended job 1 remembered then let
        a job --after-any 1 start while the new job 1 had not run."""
        self._final.clear()

    def states(self, records: Iterable[JobRecord]) -> dict[int, tuple[str, ...] | None]:
        needed = {d for r in records for d in dependency_ids(r.spec)}
        out: dict[int, tuple[str, ...] | None] = {d: self._final[d] for d in needed if d in self._final}
        wanted = sorted(needed - set(out))
        if len(self._final) > 100_000:
            self._final.clear()  # a cache: bounded, rebuilt from Redis as needed
        if not wanted:
            return out
        pipe = self.redis.pipeline(transaction=False)
        for dep in wanted:
            pipe.hmget(keys.job(dep), "state", "array_id", "array_size")
        arrays: dict[int, int] = {}
        for dep, (state, array_id, size) in zip(wanted, pipe.execute(), strict=True):
            if state is None:
                out[dep] = None
            elif array_id is not None and int(array_id) == dep and size and int(size) > 1:
                arrays[dep] = int(size)
            else:
                out[dep] = (state.decode(),)
        for dep, size in arrays.items():
            for task in range(dep, dep + size):
                pipe.hget(keys.job(task), "state")
            out[dep] = tuple(s.decode() for s in pipe.execute() if s is not None)
        for dep, got in out.items():
            if got is not None and all(s in _FINAL for s in got):
                self._final[dep] = got
        return out
