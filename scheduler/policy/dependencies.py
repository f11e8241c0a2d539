"""Job dependencies (`--after ID` = afterok, `--after-any ID` = afterany), as in Slurm.

`evaluate` is pure: given the states of a job's dependencies it says whether the job may
run, must wait (reason Dependency) or never can (a dependency of --after ended FAILED or
CANCELLED: the scheduler cancels it with reason DependencyNeverSatisfied). An id that is
an array's id (its first task) stands for every task of the array.
The states are read from Redis by scheduler/dependencies.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
