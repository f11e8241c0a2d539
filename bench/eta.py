"""Start estimates (scheduler/policy/forecast.py): how right, and how cheap.

    python -m bench eta [--quick]

1. Accuracy on the trace replays (bench/replay): gpulab's policy replays openb and Philly;
   every `--every` hours of simulated time the forecast runs on the queue as it is (the same
   inputs the scheduler would give it) and each waiting job's estimate is kept. After the
   replay, estimate vs actual start: median and p90 absolute error, bias (median of
   estimate - actual: negative = too early), and the share of jobs given an estimate,
   grouped by how far away the actual start was when the estimate was made. Two settings:
   "time limits" (every job's --time is its real run time, as in the replay's `gpulab`
   row) and "no --time" (nothing declared: running and waiting jobs take the mean run time
   of the jobs completed so far - the scheduler's learned duration with a single user and
   name, as the traces have).
2. Cost: one forecast over a synthetic lab queue of 1k and 10k waiting jobs on a full
   64 x 8 x 80 GiB cluster (bench/placement_throughput.py's mix), max_eta_steps = 200.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.replay import run as replay_run
from bench.replay.gpulab_policy import GpulabPolicy
from bench.replay.sim import Node, Queue, Start, simulate
from jobs.config import PolicyConfig
from scheduler.policy.forecast import expected_end, forecast_starts
from scheduler.policy.placement import PendingJob, RunningJob, place

HOUR = 3600.0
BUCKETS = [(0, 600, "< 10 min"), (600, 3600, "10 min - 1 h"), (3600, 6 * 3600, "1 - 6 h"),
           (6 * 3600, 24 * 3600, "6 - 24 h"), (24 * 3600, float("inf"), ">= 24 h")]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="Philly's short window only, fewer samples")
    p.add_argument("--max-steps", type=int, default=200, help="max_eta_steps of each forecast")


@dataclass
class Sample:
    job: int
    at: float
    est: float | None


class ForecastingPolicy(GpulabPolicy):
    """gpulab's policy that also runs the forecast every `every` seconds of simulated time."""

    def __init__(self, name: str, *, time_limits: bool, every: float, max_steps: int) -> None:
        GpulabPolicy.__init__(self, name, config=PolicyConfig(), time_limits=time_limits)
        self.every, self.max_steps = every, max_steps
        self.samples, self.forecast_s, self._next, self._ends = [], [], 0.0, []
        self._done_n, self._done_sum = 0, 0.0

    def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Callable[[Start], None]) -> None:
        def counted(start: Start) -> None:
            heapq.heappush(self._ends, (now + start.job.duration, start.job.duration))
            launch(start)

        super().schedule(now, queue, nodes, counted)
        while self._ends and self._ends[0][0] <= now:
            self._done_sum += heapq.heappop(self._ends)[1]
            self._done_n += 1
        if len(queue) and now >= self._next:
            self._next = now + self.every
            self._sample(now, queue, nodes)

    def _learned(self) -> float | None:
        return self._done_sum / self._done_n if self._done_n else None

    def _sample(self, now: float, queue: Queue, nodes: list[Node]) -> None:
        everything = [n.index for n in nodes]
        accounts = {f"n{i}": [self.account(nodes[i], k) for k in range(len(nodes[i].gpus))] for i in everything}
        running: list[RunningJob] = self.running(nodes, everything)
        pending = [self.pending(j) for j in queue]
        learned = self._learned()
        if not self.time_limits:
            starts = {jid: end - start.job.duration for n in nodes for jid, (end, start) in n.running.items()}
            running = [expected_end(r, starts.get(r.id), learned, now, 60.0) for r in running]

        def duration_of(job: PendingJob) -> float | None:
            return job.time_limit_s if job.time_limit_s else learned

        started = time.perf_counter()
        got = forecast_starts(
            pending, accounts, self.policy, running=running, duration_of=duration_of, now=now,
            config=self.config, max_steps=self.max_steps,
        )  # fmt: skip
        self.forecast_s.append(time.perf_counter() - started)
        self.samples.extend(Sample(j, now, est) for j, est in got.starts.items())


def accuracy(trace: str, quick: bool, every_h: float, max_steps: int) -> str:
    args = argparse.Namespace(
        trace=trace, quick=quick, nodes=None, gpus_per_node=8, card_gib=None, compress=1.0,
        start_day=None, days=None, seed=0,
    )  # fmt: skip
    jobs, cluster, setup = replay_run.load(args)
    lines = [f"**{setup}**; a forecast every {every_h:g} h of simulated time, max_eta_steps {max_steps}", ""]
    lines.append(
        "| setting | actual start was | estimates | with an estimate | median abs error | p90 abs error "
        "| bias (median est - actual) |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for label, limits in (("time limits", True), ("no --time (learned mean)", False)):
        policy = ForecastingPolicy(label, time_limits=limits, every=every_h * HOUR, max_steps=max_steps)
        result = simulate(jobs, policy, cluster)
        actual = {r.job.id: r.start for r in result.jobs}
        for lo, hi, name in BUCKETS:
            rows = [s for s in policy.samples if lo <= actual[s.job] - s.at < hi]
            if not rows:
                continue
            errs = [s.est - actual[s.job] for s in rows if s.est is not None]
            covered = len(errs) / len(rows)
            if errs:
                a = sorted(abs(e) for e in errs)
                med, p90 = statistics.median(a), a[min(len(a) - 1, int(0.9 * len(a)))]
                bias = statistics.median(errs)
                lines.append(
                    f"| {label} | {name} ahead | {len(rows):,} | {covered:.0%} | {_h(med)} | {_h(p90)} | {_h(bias)} |"
                )
            else:
                lines.append(f"| {label} | {name} ahead | {len(rows):,} | 0% | - | - | - |")
        costs = sorted(policy.forecast_s)
        lines.append(
            f"| {label} | (forecast cost) | {len(costs)} runs | | median {statistics.median(costs) * 1000:.1f} ms "
            f"| max {costs[-1] * 1000:.1f} ms | |"
        )
    return "\n".join(lines)


def _h(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    return f"{sign}{s / 60:.1f} min" if s < HOUR else f"{sign}{s / HOUR:.2f} h"


def cost(pending_n: int, max_steps: int, repeats: int = 3) -> str:
    from bench.placement_throughput import GPUS, NODES, gpu_account, synthetic_job
    from scheduler.policy.accounting import AccountingPolicy

    rng = random.Random(7)
    policy, config = AccountingPolicy(), PolicyConfig(reserve_after_s=600.0)
    jobs = [synthetic_job(rng, i, 0.0)[0] for i in range(1, pending_n + 4000)]
    empty = {f"n{n}": [gpu_account(f"n{n}", g, 0, 0, False) for g in range(GPUS)] for n in range(NODES)}
    fill = place(jobs, empty, policy, config=config, now=0.0)
    started = {a.job_id for a in fill.assignments}
    by_id = {j.id: j for j in jobs}
    held: dict[str, tuple[int, int, bool]] = {}
    running = []
    for a in fill.assignments:
        job = by_id[a.job_id]
        end = rng.uniform(60, job.time_limit_s or 3600)
        running.append(RunningJob(a.job_id, job.user, a.node, dict(a.reserved_bytes), a.whole_gpu, end))
        for uuid, amount in a.reserved_bytes.items():
            total, count, whole = held.get(uuid, (0, 0, False))
            held[uuid] = (total + amount, count + 1, whole or a.whole_gpu)
    accounts = {
        f"n{n}": [gpu_account(f"n{n}", g, *held.get(f"GPU-n{n}-{g}", (0, 0, False))) for g in range(GPUS)]
        for n in range(NODES)
    }
    waiting = [j for j in jobs if j.id not in started][:pending_n]
    times, cpu, got = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        got = forecast_starts(
            waiting, accounts, policy, running=running, duration_of=lambda j: j.time_limit_s, now=1.0,
            config=config, max_steps=max_steps,
        )  # fmt: skip
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert got is not None
    with_est = sum(1 for v in got.starts.values() if v is not None)
    return (
        f"| {len(waiting):,} | {len(running):,} | {got.steps} | {with_est:,} ({with_est / len(waiting):.0%}) "
        f"| {statistics.median(times) * 1000:,.0f} | {max(times) * 1000:,.0f} | {statistics.median(cpu) * 1000:,.0f} |"
    )


def run(args: argparse.Namespace) -> str:
    parts = ["### Accuracy (trace replays)", ""]
    if args.quick:
        parts.append(accuracy("philly", True, 0.25, args.max_steps))
    else:
        parts.append(accuracy("openb", False, 6.0, args.max_steps))
        parts.append("")
        parts.append(accuracy("philly", True, 0.25, args.max_steps))
    parts += ["", "### Cost of one forecast", ""]
    parts.append("| waiting jobs | running jobs | steps | jobs with an estimate | median ms | max ms | median CPU ms |")
    parts.append("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (1000,) if args.quick else (1000, 10000):
        parts.append(cost(n, args.max_steps))
        print(parts[-1], flush=True)
    text = "\n".join(parts)
    print(text)
    return text


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(prog="python -m bench eta", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
