"""Submit: validate, refuse what can never run, and store one job or a whole array atomically.

Admins (uid 0 or a name in [policy] admin_users) may submit on behalf of another user, like
`sbatch --uid` for root: the job is then that user's for fair share, caps and the queue.
"""

from __future__ import annotations

import pwd
import re
from dataclasses import replace
from typing import Any

import redis

from jobs import keys
from jobs.api import ApiError
from jobs.arrays import parse_array
from jobs.config import Config
from jobs.sizes import format_size
from jobs.spec import MAX_JOB_ID, JobSpec, SpecError, validate_spec
from jobs.states import Reason
from jobs.store import JobStore, TooManyWaiting, TooMuchStored, spec_size
from scheduler.cluster import read_heartbeats
from scheduler.memory import MemoryResolver
from scheduler.notify import settings as notify_settings
from scheduler.policy.accounting import AccountingPolicy, build_accounts
from scheduler.policy.feasibility import Feasibility, Shape

_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def is_admin(config: Config, uid: int, user: str) -> bool:
    return uid == 0 or user in config.policy.admin_users


class Submitter:
    def __init__(self, config: Config, client: redis.Redis, store: JobStore, policy: AccountingPolicy) -> None:
        self.config = config
        self.redis = client
        self.store = store
        self.policy = policy
        self.memory = MemoryResolver(config, store)

    def submit(self, uid: int, user: str, body: Any) -> dict[str, Any]:
        on_behalf = None
        if isinstance(body, dict) and "user" in body:
            body = dict(body)
            on_behalf = body.pop("user")
        try:
            spec = JobSpec.from_json(body)
        except SpecError as exc:
            raise ApiError(400, str(exc)) from None
        if on_behalf is not None:
            user, uid = self._on_behalf(uid, user, on_behalf)
        self._check_dependencies(spec)
        memory = self.memory.resolve(spec, user)
        if memory.spec.mem_bytes != spec.mem_bytes:
            try:  # a learned or estimated request no node can offer: a whole GPU instead
                self._check_feasible(memory.spec)
            except ApiError as exc:
                memory = self.memory.whole_gpu_instead(memory, f"refused: {exc.message}")
        spec, extra = memory.spec, memory.fields()
        self._check_feasible(spec)
        spec, secret = notify_settings.for_submit(self.config, self.redis, user, spec)
        shown = {"notify_secret": secret} if secret else {}  # a new webhook secret: shown once
        if spec.array:
            ids = self._submit_array(spec, user, uid, extra)
            return {"id": ids[0], "array_id": ids[0], "ids": ids, **shown, "mem_origin": memory.origin}
        limit = self.config.scheduler.max_pending_per_user
        size = spec_size(spec)
        self._check_submit_size(size, 1)
        try:
            job_id = self.store.submit(
                spec, user=user, uid=uid, max_waiting=limit, max_bytes=self._max_bytes, extra=extra
            )
            return {"id": job_id, **shown, "mem_origin": memory.origin}
        except TooManyWaiting:
            raise self._too_many(user, 1) from None
        except TooMuchStored:
            raise self._too_much(user, size) from None

    @property
    def _max_bytes(self) -> int | None:
        return self.config.scheduler.max_stored_per_user_bytes or None

    def _check_submit_size(self, size: int, tasks: int) -> None:
        """One submit may add at most [scheduler] max_submit_size bytes of specs."""
        limit = self.config.scheduler.max_submit_size_bytes
        if limit and size > limit:
            what = f"{tasks} tasks x {format_size(size // tasks)}" if tasks > 1 else format_size(size)
            raise ApiError(
                413,
                f"this submit would store {what} of command and environment, over {format_size(limit)} "
                "([scheduler] max_submit_size); pass a smaller environment (--export NAME,... or a file "
                "the job reads) or fewer tasks",
            )

    def _too_much(self, user: str, adding: int) -> ApiError:
        limit = self.config.scheduler.max_stored_per_user_bytes
        return ApiError(
            429,
            f"{user}'s waiting jobs hold {format_size(self.store.waiting_bytes(user))} of command and environment; "
            f"adding {format_size(adding)} would pass {format_size(limit)} ([scheduler] max_stored_per_user); "
            "wait for some to start, cancel some, or submit with a smaller environment (--export)",
        )

    def _too_many(self, user: str, adding: int) -> ApiError:
        limit = self.config.scheduler.max_pending_per_user
        return ApiError(
            429,
            f"{user} already has {self.store.waiting_count(user)} waiting jobs; adding {adding} would pass "
            f"the limit of {limit} ([scheduler] max_pending_per_user); wait for some to start or cancel some",
        )

    def _on_behalf(self, uid: int, user: str, name: Any) -> tuple[str, int]:
        if not is_admin(self.config, uid, user):
            raise ApiError(403, "--user: only admins (root or [policy] admin_users) may submit for another user")
        if not isinstance(name, str) or not _USER_RE.match(name):
            raise ApiError(400, "--user: must be a user name (letters, digits, _.-; up to 32)")
        try:
            return name, pwd.getpwnam(name).pw_uid  # the job runs as this user
        except KeyError:
            raise ApiError(400, f"--user: no user '{name}' on the scheduler's host") from None

    def _check_dependencies(self, spec: JobSpec) -> None:
        deps = sorted(set(spec.after_ok) | set(spec.after_any))
        if not deps:
            return
        pipe = self.redis.pipeline(transaction=False)
        for dep in deps:
            pipe.exists(keys.job(dep))
        for dep, exists in zip(deps, pipe.execute(), strict=True):
            if not exists:
                flag = "--after" if dep in spec.after_ok else "--after-any"
                raise ApiError(400, f"{flag}: no job {dep}")

    def _check_feasible(self, spec: JobSpec) -> None:
        """Refuse what no online node could ever run. With no node online, accept: one may come."""
        if spec.node and not self.redis.sismember(keys.NODES, spec.node):
            known = sorted(n.decode() for n in self.redis.smembers(keys.NODES))
            raise ApiError(400, f"--node: no node named '{spec.node}' (known: {', '.join(known) or 'none yet'})")
        beats, _down = read_heartbeats(self.redis)
        if not beats:
            return
        accounts = build_accounts(beats, [], self.policy)
        shape = Shape(spec.gpus, spec.mem_bytes, spec.exclusive, spec.node, spec.gpu_model)
        why = Feasibility(accounts, self.policy.headroom_bytes).why_never(shape)
        if why is not None:
            raise ApiError(400, f"{Reason.INFEASIBLE.value}: {why}")

    def _submit_array(self, spec: JobSpec, user: str, uid: int, extra: dict[str, str] | None = None) -> list[int]:
        indexes = list(parse_array(spec.array).indexes)
        limit = self.config.policy.max_array_size
        if len(indexes) > limit:
            raise ApiError(400, f"--array: {len(indexes)} tasks; at most {limit} ([policy] max_array_size)")
        waiting_limit = self.config.scheduler.max_pending_per_user
        if self.store.waiting_count(user) + len(indexes) > waiting_limit:
            raise self._too_many(user, len(indexes))  # before reserving ids: nothing to undo
        # Tasks differ only in their GPULAB_ARRAY_* values (digits): the task with the longest
        # ones - the largest index, and the longest array id there is in place of the real one -
        # is at least as large as any other in every check. Checking and sizing it before any id
        # is taken means nothing can fail after the reservation, and costs one task, not n.
        widest = self._task(spec, max(indexes), MAX_JOB_ID, len(indexes))
        size = spec_size(widest) * len(indexes)  # an upper bound of what the tasks store
        self._check_submit_size(size, len(indexes))
        max_bytes = self._max_bytes
        if max_bytes is not None and self.store.waiting_bytes(user) + size > max_bytes:
            raise self._too_much(user, size)
        first = self.store.reserve_ids(len(indexes))
        tasks = [self._task(spec, index, first, len(indexes)) for index in indexes]
        try:
            return self.store.submit_reserved(
                first, tasks, user=user, uid=uid, max_waiting=waiting_limit, array_indexes=indexes,
                max_bytes=max_bytes, extra=extra,
            )  # fmt: skip
        except TooManyWaiting:
            raise self._too_many(user, len(tasks)) from None
        except TooMuchStored:
            raise self._too_much(user, size) from None

    @staticmethod
    def _task(spec: JobSpec, index: int, first: int, count: int) -> JobSpec:
        env = {
            **spec.env,
            "GPULAB_ARRAY_JOB_ID": str(first),
            "GPULAB_ARRAY_INDEX": str(index),
            "GPULAB_ARRAY_TASK_COUNT": str(count),
        }
        task = replace(spec, env=env)
        try:
            validate_spec(task)
        except SpecError as exc:
            raise ApiError(400, f"--array task {index}: {exc}") from None
        return task
