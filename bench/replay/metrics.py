"""Summaries of a simulation and the markdown table of them."""

from __future__ import annotations

from dataclasses import dataclass

from bench.replay.sim import SimResult


@dataclass(frozen=True)
class Summary:
    policy: str
    jobs: int
    avg_jct_s: float
    p95_jct_s: float
    mean_wait_s: float
    max_wait_s: float
    makespan_s: float
    mem_util_queued: float  # requested / capacity, averaged over time with a non-empty queue
    queued_s: float
    oom: int
    sim_s: float  # wall-clock seconds the simulation took


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation): an actual sample."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summarise(result: SimResult, sim_s: float = 0.0) -> Summary:
    jobs = result.jobs
    jcts = [r.jct for r in jobs]
    first = min((r.job.arrival for r in jobs), default=0.0)
    last = max((r.end for r in jobs), default=0.0)
    util = result.requested_while_queued / (result.capacity * result.queued_time) if result.queued_time else 0.0
    return Summary(
        policy=result.policy,
        jobs=len(jobs),
        avg_jct_s=sum(jcts) / len(jcts) if jcts else 0.0,
        p95_jct_s=percentile(jcts, 95),
        mean_wait_s=sum(r.wait for r in jobs) / len(jobs) if jobs else 0.0,
        max_wait_s=max((r.wait for r in jobs), default=0.0),
        makespan_s=last - first,
        mem_util_queued=util,
        queued_s=result.queued_time,
        oom=sum(r.oom for r in jobs),
        sim_s=sim_s,
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def table(summaries: list[Summary]) -> str:
    head = (
        "| policy | jobs | avg JCT (h) | p95 JCT (h) | mean wait (h) | max wait (h) | makespan (h) "
        "| mem util while queued | time with a queue (h) | would OOM | sim time (s) |"
    )
    lines = [head, "|" + " --- |" * 11]
    for s in summaries:
        hours = " | ".join(_hours(x) for x in (s.avg_jct_s, s.p95_jct_s, s.mean_wait_s, s.max_wait_s, s.makespan_s))
        rest = f"{s.mem_util_queued:.1%} | {_hours(s.queued_s)} | {s.oom} | {s.sim_s:.2f}"
        lines.append(f"| {s.policy} | {s.jobs} | {hours} | {rest} |")
    return "\n".join(lines)
