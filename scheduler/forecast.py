"""Start estimates for the scheduler loop: when to recompute the pure forecast
(scheduler/policy/forecast.py), with what durations, and the learned-duration history.

Cost is bounded and kept off the pass: the forecast runs at most every `eta_interval_s`
(sooner, but at most once a second, when the set of waiting jobs changed; never sooner than
ten times its own last duration, so it takes at most a tenth of a core), each run makes
at most `max_eta_steps` placement calls, and it runs in a forked child process over values
the pass handed it (the policy is pure; scheduler/offload.py), so a pass never waits for it
nor shares the GIL with it: each pass writes the newest finished answer (BENCHMARKS.md:
about 0.6 s of CPU at 1k waiting jobs, 5 s at 10k, on a 64 x 8 GPU cluster).

Durations, in this order: the job's time limit; the mean run time of the user's completed
jobs of the same name (`gpulab:durations`, learned as jobs complete); else
`eta_default_runtime_s` (0: unknown, so nothing behind such a job gets an estimate).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import redis

from jobs import keys
from jobs.config import Config
from jobs.lifecycle import Fence
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import Fenced, JobStore
from scheduler.offload import in_child
from scheduler.policy.accounting import AccountingPolicy, GpuAccount
from scheduler.policy.forecast import expected_end, forecast_starts
from scheduler.policy.types import PendingJob, RunningJob

log = logging.getLogger("gpulab.scheduler")

Forecast = tuple[dict[int, float | None], float, int]  # (starts, milliseconds it took, placement steps)
OVERDUE_GRACE_S = 60.0  # a running job past its usual duration is expected to end this soon
MIN_RECOMPUTE_S = 1.0  # a changed queue recomputes at most this often
# ... and never sooner than this many times the last forecast's own duration: without it a
# 10k queue that changes every second would keep a core busy forecasting (on the thread it
# once ran on, that slowed every pass ~9x: BENCHMARKS.md, section 11).
COST_FACTOR = 10.0
ENDED_FIELDS = ("state", "started_at", "ended_at")  # what learning needs of a job that left
LEARN_EVERY_S = 1.0  # jobs that left are learned from together, at most this often (3 round
# trips each time: once per pass, a drain of short jobs spent a quarter of the scheduler there)
MAX_LEARNED = 10_000  # (user, name) pairs kept; past it, the history starts over (bounded Redis)


def duration_key(user: str, name: str) -> str:
    return f"{user}\t{name}"


class DurationHistory:
    """Mean run time of completed jobs per (user, job name), in one Redis hash."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def learn(self, records: list[JobRecord], fence: Fence | None = None) -> None:
        done = [r for r in records if r.state == JobState.COMPLETED and r.started_at and r.ended_at]
        if not done:
            return
        # One read and one write for the whole batch: this runs inside the scheduling pass.
        names = sorted({duration_key(r.user, r.spec.display_name) for r in done})
        pipe = self.redis.pipeline(transaction=False)
        pipe.hlen(keys.DURATIONS)
        pipe.hmget(keys.DURATIONS, names)
        count, raws = pipe.execute()
        full = count > MAX_LEARNED
        means: dict[str, tuple[int, float]] = {}
        for key, raw in zip(names, raws, strict=True):
            means[key] = (None if full else _parse(raw)) or (0, 0.0)
        for r in done:
            assert r.started_at is not None and r.ended_at is not None
            key = duration_key(r.user, r.spec.display_name)
            n, mean = means[key]
            run = max(0.0, r.ended_at - r.started_at)
            n = min(n + 1, 20)  # a running mean over about the last 20 runs
            means[key] = (n, mean + (run - mean) / n)
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                # A leader's write: refused once a newer leader holds the fence (a paused
                # ex-leader that resumes must not count completions the new one counts too).
                if fence is not None:
                    pipe.watch(fence.key)
                    if pipe.get(fence.key) != fence.token.encode():
                        raise Fenced("learned durations refused: a newer leader holds the fence")
                pipe.multi()
                if full:  # bounded: past MAX_LEARNED names the history starts over
                    pipe.delete(keys.DURATIONS)
                mapping = {k: json.dumps({"n": n, "mean": round(m, 3)}) for k, (n, m) in means.items()}
                pipe.hset(keys.DURATIONS, mapping=mapping)
                pipe.execute()
            except redis.WatchError:
                raise Fenced("learned durations refused: a newer leader holds the fence") from None

    def all(self) -> dict[str, float]:
        out = {}
        for k, v in self.redis.hgetall(keys.DURATIONS).items():
            parsed = _parse(v)
            if parsed is not None:
                out[k.decode(errors="replace")] = parsed[1]
        return out


def _parse(raw: bytes | str | None) -> tuple[int, float] | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return int(data["n"]), float(data["mean"])
    except (ValueError, TypeError, KeyError):
        return None  # someone else's junk in our key: ignore it, never fail the pass


class Forecaster:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self.redis = client
        self.store = JobStore(client)
        self.config = config
        self.history = DurationHistory(client)
        self.fence: Fence | None = None  # the leader's, set by the loop before each pass
        self._at = -float("inf")
        self._queue: frozenset[int] = frozenset()
        self._active: dict[int, JobRecord] = {}  # the active jobs of the last pass
        self._gone: dict[int, JobRecord] = {}  # jobs that left the active set, not yet learned from
        self._learned_at = -float("inf")  # time.monotonic() of the last learning
        self.starts: dict[int, float | None] = {}
        self.last_ms = 0.0
        self.last_steps = 0
        self._thread: threading.Thread | None = None
        self._done: dict[int, float | None] | None = None  # set by the thread, taken by the pass

    def learn_from(self, active: Mapping[int, JobRecord], changed: Iterable[int] | None = None) -> None:
        """Jobs that left the active set (`active`: id -> record, with `changed` the ids that
        came, changed or went since the last call, None for any): learn the run time of those
        that completed, at most every LEARN_EVERY_S for all that left since. Their user and
        name are in the records of the pass before they left, so only the three fields that
        moved since are read, for all of them in one call."""
        if changed is None:
            for job_id in self._active.keys() - active.keys():
                self._gone[job_id] = self._active[job_id]
            self._active = dict(active)
        else:
            for job_id in changed:
                record = active.get(job_id)
                if record is not None:
                    self._active[job_id] = record
                elif job_id in self._active:
                    self._gone[job_id] = self._active.pop(job_id)
        clock = time.monotonic()
        if not self._gone or clock - self._learned_at < LEARN_EVERY_S:
            return
        self._learned_at = clock
        before, self._gone = self._gone, {}
        gone = sorted(before)
        ended = []
        for job_id, (state, started, ended_at) in zip(gone, self.store.job_fields(gone, ENDED_FIELDS), strict=True):
            if state is None:
                continue  # its record is gone
            try:
                ended.append(
                    replace(
                        before[job_id],
                        state=JobState(state),
                        started_at=float(started) if started else None,
                        ended_at=float(ended_at) if ended_at else None,
                    )
                )
            except ValueError:
                continue  # not ours to judge: quarantine reads records, learning skips them
        self.history.learn(ended, self.fence)

    def due(self, now: float, queue: frozenset[int]) -> bool:
        interval = self.config.scheduler.eta_interval_s
        if interval <= 0:
            return False
        since = now - self._at
        gap = max(MIN_RECOMPUTE_S, COST_FACTOR * self.last_ms / 1000)
        return since >= max(interval, gap) or (queue != self._queue and since >= gap)

    def update(
        self,
        now: float,
        jobs: dict[int, PendingJob],
        records: Callable[[int], JobRecord | None],
        accounts: dict[str, list[GpuAccount]],
        policy: AccountingPolicy,
        running: list[RunningJob],
        active: Mapping[int, JobRecord],
        changed: set[int] | None,
        usage: dict[str, float],
        unavailable: frozenset[str],
    ) -> dict[int, float | None]:
        """The cached estimates, recomputed when due. `records`: a waiting job's record (names);
        `active`: the active jobs' records by id, `changed` as `learn_from` takes it."""
        self.learn_from(active, changed)
        if self._done is not None:
            self.starts, self._done = self._done, None
        queue = frozenset(jobs)
        if (self._thread is not None and self._thread.is_alive()) or not self.due(now, queue):
            return self.starts
        compute = self._prepare(
            now, jobs, records, accounts, policy, running, list(active.values()), usage, unavailable
        )
        self._at, self._queue = now, queue
        self._thread = threading.Thread(target=self._run, args=(compute,), name="gpulab-forecast", daemon=True)
        self._thread.start()
        return self.starts

    def _run(self, compute: Callable[[], Forecast]) -> None:
        try:
            starts, self.last_ms, self.last_steps = in_child(compute)  # off this process's GIL
        except Exception:
            log.exception("start forecast failed; estimates are kept as they were")
            return
        log.debug("forecast: %d jobs, %d steps, %.1f ms", len(starts), self.last_steps, self.last_ms)
        self._done = starts

    def _prepare(
        self,
        now: float,
        jobs: dict[int, PendingJob],
        records: Callable[[int], JobRecord | None],
        accounts: dict[str, list[GpuAccount]],
        policy: AccountingPolicy,
        running: list[RunningJob],
        active: list[JobRecord],
        usage: dict[str, float],
        unavailable: frozenset[str],
    ) -> Callable[[], Forecast]:
        """Read what the forecast needs (the learned durations) now; return the pure work."""
        learned = self.history.all()
        default = self.config.scheduler.eta_default_runtime_s or None
        started_at = {r.id: (r.started_at or r.assigned_at) for r in active}
        names = {r.id: r.spec.display_name for r in active}

        def learned_for(user: str, name: str) -> float | None:
            return learned.get(duration_key(user, name), default)

        ends = [
            expected_end(r, started_at.get(r.id), learned_for(r.user, names.get(r.id, "")), now, OVERDUE_GRACE_S)
            for r in running
        ]

        # The names now, on the pass's thread: the records behind `records` change with the queue.
        unlimited = {}
        for job in jobs.values():
            if not job.time_limit_s:
                record = records(job.id)
                unlimited[job.id] = record.spec.display_name if record else ""

        def duration_of(job: PendingJob) -> float | None:
            if job.time_limit_s:
                return job.time_limit_s
            return learned_for(job.user, unlimited.get(job.id, ""))

        pending = list(jobs.values())
        usage = dict(usage)

        def compute() -> Forecast:
            started = time.perf_counter()
            result = forecast_starts(
                pending,
                accounts,
                policy,
                running=ends,
                duration_of=duration_of,
                now=now,
                config=self.config.policy,
                usage=usage,
                unavailable_nodes=unavailable,
                max_steps=self.config.scheduler.max_eta_steps,
            )
            return result.starts, (time.perf_counter() - started) * 1000, result.steps

        return compute
