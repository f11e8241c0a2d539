"""Job dependencies (`--after ID` = afterok, `--after-any ID` = afterany), as in Slurm.

`evaluate` is pure: given the states of a job's dependencies it says whether the job may
run, must wait (reason Dependency) or never can (a dependency of --after ended FAILED or
CANCELLED: the scheduler cancels it with reason DependencyNeverSatisfied). An id that is
an array's id (its first task) stands for every task of the array.
`DependencyReader` fetches those states from Redis, remembering final ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

from jobs import keys
from jobs.record import JobRecord
from jobs.spec import JobSpec
from jobs.states import FINAL_STATES, JobState

_FINAL = frozenset(s.value for s in FINAL_STATES)
_OK = JobState.COMPLETED.value


@dataclass(frozen=True)
class Verdict:
    ready: bool
    never: bool = False
    detail: str = ""


READY = Verdict(True)


def dependency_ids(spec: JobSpec) -> set[int]:
    return set(spec.after_ok) | set(spec.after_any)


def evaluate(spec: JobSpec, states: Mapping[int, tuple[str, ...] | None]) -> Verdict:
    """`states[id]`: the states of that job (or of every task, for an array); None = no such job."""
    waiting: list[int] = []
    for dep in spec.after_ok:
        got = states.get(dep)
        if got is None:
            return Verdict(False, True, f"dependency {dep} does not exist")
        bad = next((s for s in got if s in _FINAL and s != _OK), None)
        if bad is not None:
            return Verdict(False, True, f"dependency {dep} ended {bad}")
        if not all(s == _OK for s in got):
            waiting.append(dep)
    for dep in spec.after_any:
        got = states.get(dep)
        if got is None:
            return Verdict(False, True, f"dependency {dep} does not exist")
        if not all(s in _FINAL for s in got):
            waiting.append(dep)
    if waiting:
        return Verdict(False, False, "waiting for job " + ", ".join(str(d) for d in sorted(set(waiting))) + " to end")
    return READY


class DependencyReader:
    """States of the jobs that waiting jobs depend on. Final states never change, so they
    are remembered; others are read again each pass (one pipeline)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._final: dict[int, tuple[str, ...]] = {}

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
