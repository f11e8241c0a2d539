"""Idle jobs on the real stack: the simulated probe reports the utilisation a job announces;
a job holding GPU memory at 0% for idle_after_s is flagged (record, queue, show, history,
the notification hook), a busy one never is, and under idle_action = "stop" it is stopped
and HELD with reason Idle."""

from __future__ import annotations

import json
from collections.abc import Callable

from jobs import keys
from jobs.states import JobState
from tests.helpers.stack import Stack, eventually


def heartbeats_after(stack: Stack, node: str, moment: float, count: int = 3) -> None:
    """Await `count` heartbeats of `node` measured after `moment`."""
    seen: set[float] = set()

    def probe() -> bool:
        raw = stack.redis.get(keys.node(node))
        if raw is not None:
            at = json.loads(raw)["snapshot"]["taken_at"]
            if at > moment:
                seen.add(at)
        return len(seen) >= count

    eventually(probe)


def test_an_idle_job_is_flagged_and_its_owner_notified_a_busy_one_never(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(policy={"idle_after_s": 1.0, "idle_action": "notify"})
    stack.start_scheduler()
    stack.start_worker("n1", "2x24GiB")
    idle = stack.submit("--mem", "4GiB", *stack.hold_job_args("2GiB", stack.fifo("idle"), "--util=0"))
    # Too big to share the idle job's GPU (a busy co-tenant would make that GPU busy too).
    busy = stack.submit("--mem", "22GiB", *stack.hold_job_args("2GiB", stack.fifo("busy")))
    flagged = stack.wait_for(idle, lambda r: r.idle_since is not None)
    assert flagged.state == JobState.RUNNING
    events = [e for e in stack.store.history(idle) if e.get("reason") == "Idle"]
    assert len(events) == 1 and "<= 1% utilisation" in events[0]["detail"]
    hooks = [f for _, f in stack.redis.xrange(keys.NOTIFY_EVENTS) if f[b"event"] == b"idle"]
    assert [int(f[b"job"]) for f in hooks] == [idle]
    queue = {row.split()[0]: row for row in stack.cli("queue", check=True).stdout.splitlines()[1:]}
    assert "IDLE" in queue[str(idle)] and "IDLE" not in queue[str(busy)]
    assert "Idle" in stack.cli("show", str(idle), check=True).stdout
    assert "IDLE" in stack.cli("top", "--once", check=True).stdout
    running = stack.wait_state(busy, JobState.RUNNING)
    heartbeats_after(stack, "n1", (running.started_at or 0) + 1.0)
    assert stack.store.get(busy).idle_since is None  # type: ignore[union-attr]
    assert not [e for e in stack.store.history(busy) if e.get("reason") == "Idle"]
    assert stack.cli("cancel", str(idle), str(busy)).returncode == 0


def test_under_stop_an_idle_job_is_stopped_and_held_to_be_released(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(policy={"idle_after_s": 1.0, "idle_action": "stop"})
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    idle = stack.submit("--mem", "4GiB", *stack.hold_job_args("2GiB", stack.fifo("idle"), "--util=0"))
    held = stack.wait_state(idle, JobState.HELD)
    assert held.reason == "Idle" and "gpulab release" in held.detail
    assert held.ended_at is None and held.node == ""  # it gave its GPU back and may run again
    assert stack.cli("release", str(idle)).returncode == 0
    assert stack.wait_state(idle, JobState.RUNNING, JobState.HELD).attempt == 2
    assert stack.cli("cancel", str(idle)).returncode == 0
