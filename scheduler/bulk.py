"""Bulk `cancel` / `hold` / `release`: one API call for thousands of jobs.

The request names job ids and array ids (`{"ids": [...], "arrays": [...]}`); an array id
stands for every task of that array. Jobs are read and changed in batches: one pipelined read
of the records, then one pipeline of transition scripts (each atomic on its own, exactly the
single-job transition from jobs/lifecycle.py), so 2,000 jobs cost a few round trips instead
of 2,000 API calls. Every id gets its own result - its new state, or why not - and one job's
refusal never stops the others.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from jobs import lifecycle
from jobs.api import JOB_ACTIONS, MAX_BULK_IDS, ApiError
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import TransitionRefused

if TYPE_CHECKING:
    from scheduler.service import Caller, SchedulerService

BATCH = 500  # jobs per pipeline: bounded replies, and other clients are served in between
_VERB_WORDS = {"cancel": "cancel it", "hold": "hold it", "release": "release it"}


def _id_list(body: dict[str, Any], name: str) -> list[int]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(type(v) is int and 0 < v < 10**12 for v in value):
        raise ApiError(400, f"'{name}' must be a list of job ids (positive integers)")
    if len(value) > MAX_BULK_IDS:
        raise ApiError(413, f"at most {MAX_BULK_IDS} job ids in one request")
    return value


def bulk_action(svc: SchedulerService, caller: Caller, verb: str, body: Any) -> dict[str, Any]:
    if verb not in JOB_ACTIONS:
        raise ApiError(404, f"no such action: {verb}")
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be an object with 'ids' and/or 'arrays'")
    ids, arrays = _id_list(body, "ids"), _id_list(body, "arrays")
    results: dict[int, dict[str, Any]] = {}
    expanded, array_errors = _expand_arrays(svc, arrays)
    wanted = list(dict.fromkeys([*ids, *expanded]))  # order kept, each job once
    if len(wanted) > MAX_BULK_IDS:
        raise ApiError(413, f"these arrays hold more than {MAX_BULK_IDS} jobs; name fewer at once")
    for start in range(0, len(wanted), BATCH):
        results.update(_apply(svc, caller, verb, wanted[start : start + BATCH]))
    ordered = [results[j] for j in wanted] + array_errors
    return {"results": ordered}


def _expand_arrays(svc: SchedulerService, arrays: list[int]) -> tuple[list[int], list[dict[str, Any]]]:
    """Every task of each array (an array's tasks have consecutive ids from its array id);
    an id that is not an array's gets an error result."""
    tasks: list[int] = []
    errors: list[dict[str, Any]] = []
    for array_id, (field_array, field_size) in zip(
        arrays, svc.store.job_fields(arrays, ("array_id", "array_size")), strict=True
    ):
        if field_array is None or int(field_array) != array_id or not field_size:
            errors.append({"id": array_id, "error": f"job {array_id} is not an array's id", "status": 404})
            continue
        tasks += range(array_id, array_id + int(field_size))
    return list(dict.fromkeys(tasks)), errors


def _error(job_id: int, status: int, message: str) -> dict[str, Any]:
    return {"id": job_id, "error": message, "status": status}


def _apply(svc: SchedulerService, caller: Caller, verb: str, batch: list[int]) -> dict[int, dict[str, Any]]:
    invalid: dict[int, str] = {}
    records = {r.id: r for r in svc.store.get_many(batch, invalid)}
    out: dict[int, dict[str, Any]] = {}
    transitions: list[lifecycle.Transition] = []
    running: list[JobRecord] = []
    now = time.time()
    for job_id in batch:
        record = records.get(job_id)
        if job_id in invalid:
            out[job_id] = _error(job_id, 409, f"job {job_id}: {invalid[job_id]}; the scheduler quarantines it")
        elif record is None:
            out[job_id] = _error(job_id, 404, f"no job {job_id}")
        elif not svc.may_see(caller, record):
            why = f"job {job_id} belongs to {record.user}; only its owner or an admin may {_VERB_WORDS[verb]}"
            out[job_id] = _error(job_id, 403, why)
        elif verb == "cancel" and record.is_final:
            out[job_id] = {"id": job_id, "state": record.state.value, "note": "already finished"}
        elif verb == "cancel" and record.state == JobState.RUNNING:
            running.append(record)
            out[job_id] = {"id": job_id, "state": "CANCELLING"}
        elif verb == "cancel":
            by = f"cancelled by {caller.user}"
            transitions.append(
                lifecycle.cancel(job_id, record.state, by, now, node=record.node, attempt=record.attempt)
            )
        elif verb == "hold":
            transitions.append(lifecycle.hold(job_id, caller.user))
        else:
            transitions.append(lifecycle.release(job_id, caller.user))
    asked = svc.store.request_cancel_many([(r.id, r.node, r.attempt) for r in running], caller.user)
    for record, done in zip(running, asked, strict=True):
        if not done:  # that attempt ended or was requeued since we read it: the single-job path retries
            out[record.id] = _one(svc, caller, verb, record.id)
    # One wake for the batch, after it, instead of one scheduler pass per job.
    transitions = [replace(t, wake=False) for t in transitions]
    outcomes = svc.store.transition_many(transitions)
    if transitions:
        svc.store.wake_scheduler()
    for t, outcome in zip(transitions, outcomes, strict=True):
        if not isinstance(outcome, TransitionRefused):
            out[t.job_id] = {"id": t.job_id, "state": t.target.value}
        elif verb == "cancel":  # it moved (e.g. started) since we read it: the single-job path retries
            out[t.job_id] = _one(svc, caller, verb, t.job_id)
        else:
            out[t.job_id] = _error(t.job_id, 409, f"cannot {verb} job {t.job_id}: it is {outcome.current}")
    return out


def _one(svc: SchedulerService, caller: Caller, verb: str, job_id: int) -> dict[str, Any]:
    try:
        return dict(getattr(svc, verb)(caller, job_id))
    except ApiError as exc:
        return _error(job_id, exc.status, exc.message)
