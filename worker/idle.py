"""Idle jobs: a job that holds GPU memory while every one of its GPUs stays at or below
`[policy] idle_max_util_percent` utilisation for `idle_after_s` is idle (README "Idle jobs").

The worker measures each heartbeat and keeps, per attempt, since when the job has been
idle; crossing `idle_after_s` happens once per idle spell and triggers `idle_action`:

- flag:   the record's `idle_since` is set (queue/top/show mark the job IDLE) and an Idle
          event goes into the job's history;
- notify: the same, plus the notification event `idle` (jobs.notify_events.emit) that the
          owner's notifications deliver;
- stop:   the same, then the job is stopped (SIGTERM first: a built-in-loop job
          checkpoints) and HELD with reason Idle; `gpulab release` runs it again.

Utilisation is NVML's per GPU (the simulated probe's per file): a job sharing a GPU with a
busy co-tenant never counts as idle. A GPU that reports no utilisation is never idle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IdleWatch:
    after_s: float
    max_util_percent: float
    since: float | None = None  # start of the current idle spell
    reported: bool = False  # the current spell crossed `after_s` and was acted on

    def update(self, holding_bytes: int, utils: list[int | None], now: float) -> bool:
        """Feed one measurement; True exactly once per spell, when it first lasts `after_s`."""
        idle = (
            self.after_s > 0
            and holding_bytes > 0
            and bool(utils)
            and all(u is not None and u <= self.max_util_percent for u in utils)
        )
        if not idle:
            self.since, self.reported = None, False
            return False
        if self.since is None:
            self.since = now
        if not self.reported and now - self.since >= self.after_s:
            self.reported = True
            return True
        return False

    @property
    def flagged_since(self) -> float | None:
        """When the spell began, once it has lasted `after_s` (what the record shows); else None."""
        return self.since if self.reported else None
