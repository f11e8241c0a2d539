"""`python -m bench preempt`: preemption by checkpoint on the trace replays.

The traces carry no priorities, so a seeded 10% of jobs get `--priority 1000` (the rest 0);
every job is preemptible (as built-in-loop jobs are) and checkpoints every
`--checkpoint-min` minutes of its run: a preempted job loses the work since its last
checkpoint and queues again for the rest. Two runs of gpulab's real `place()` on the same
jobs - priorities without preemption, and with the real preemption policy
(`scheduler.policy.preemption.choose_preemption`, `preempt_after_s` = `--after-min`,
`preempt_min_run_s` 10 min, margin 100) - compared on JCT and wait for the high-priority
jobs and for everyone, the number of preemptions and the work lost. The prefilter of
bench/replay/gpulab_policy.py assumes equal priorities, so both runs pass the whole queue
(exact, slower).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.replay import run as replay_run
from bench.replay.gpulab_policy import USER, GpulabPolicy
from bench.replay.sim import Node, Queue, SimJob, SimResult, Start, simulate
from jobs.config import PolicyConfig
from scheduler.policy.placement import PendingJob
from scheduler.policy.preemption import Candidate, choose_preemption

HIGH = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", choices=["openb", "philly"], default="philly")
    p.add_argument("--quick", action="store_true", help="the trace's short window (as `bench replay --quick`)")
    p.add_argument("--high-share", type=float, default=0.1, help="share of jobs with --priority 1000")
    p.add_argument("--after-min", type=float, default=10.0, help="preempt_after_s, in minutes")
    p.add_argument("--checkpoint-min", type=float, default=10.0, help="checkpoint interval of every job")
    p.add_argument("--seed", type=int, default=0)


class PriorityPolicy(GpulabPolicy):
    """gpulab's policy with per-job priorities; with `preempt`, also the preemption policy."""

    def __init__(self, name: str, high: set[int], *, preempt: PolicyConfig | None, checkpoint_s: float) -> None:
        config = preempt or PolicyConfig()
        super().__init__(name, config=config, prefilter=False)
        self.high, self.preempt, self.checkpoint_s = high, preempt, checkpoint_s
        self.stop: Callable[[int, float], None] | None = None
        self.preemptions = 0

    def bind(self, stop: Callable[[int, float], None]) -> None:
        self.stop = stop

    def pending(self, job: SimJob) -> PendingJob:
        return replace(super().pending(job), priority=HIGH if job.id in self.high else 0)

    def running(self, nodes: list[Node], wanted: list[int]) -> list[Any]:
        self._running.clear()  # a preempted job runs again with a new end
        return super().running(nodes, wanted)

    def schedule(self, now: float, queue: Queue, nodes: list[Node], launch: Callable[[Start], None]) -> None:
        super().schedule(now, queue, nodes, launch)
        if self.preempt is None or self.stop is None:
            return
        for _ in range(4):  # a few preemptions per instant at most, as a few passes would
            waiting = [self.pending(j) for j in queue if j.id in self.high]
            if not waiting:
                return
            everything = [n.index for n in nodes]
            accounts = {f"n{i}": [self.account(nodes[i], k) for k in range(len(nodes[i].gpus))] for i in everything}
            running = self.running(nodes, everything)
            started = {jid: end - s.job.duration for n in nodes for jid, (end, s) in n.running.items()}
            candidates = [
                Candidate(r, HIGH if r.id in self.high else 0, started[r.id], preemptible=True) for r in running
            ]
            chosen = choose_preemption(
                waiting, candidates, accounts, self.policy, config=self.preempt, expected={},
                usage={USER: 1.0}, now=now,
            )  # fmt: skip
            if chosen is None:
                return
            for victim in chosen.victims:
                self.stop(victim, self.checkpoint_s)
                self.preemptions += 1
            super().schedule(now, queue, nodes, launch)


def _row(label: str, result: SimResult, high: set[int], preemptions: int, sim_s: float) -> str:
    def h(x: float) -> str:
        return f"{x / 3600:.2f}"

    hi = [r for r in result.jobs if r.job.id in high]
    lo = [r for r in result.jobs if r.job.id not in high]
    lost = sum(r.lost for r in result.jobs)
    return (
        f"| {label} | {h(statistics.mean(r.jct for r in hi))} | {h(max(r.wait for r in hi))} "
        f"| {h(statistics.mean(r.jct for r in lo))} | {h(max(r.wait for r in lo))} "
        f"| {h(statistics.mean(r.jct for r in result.jobs))} | {preemptions} | {h(lost)} | {sim_s:.1f} |"
    )


def run(args: argparse.Namespace) -> str:
    load_args = argparse.Namespace(
        trace=args.trace, quick=args.quick, nodes=None, gpus_per_node=8, card_gib=None, compress=1.0,
        start_day=None, days=None, seed=args.seed,
    )  # fmt: skip
    jobs, cluster, setup = replay_run.load(load_args)
    rng = random.Random(args.seed)
    high = {j.id for j in jobs if rng.random() < args.high_share}
    config = PolicyConfig(preempt_after_s=args.after_min * 60, preempt_min_run_s=600.0, preempt_margin=100.0)
    lines = [
        f"**{setup}**; {len(high)} jobs ({args.high_share:.0%}) at --priority {HIGH}; every job preemptible, "
        f"checkpoint every {args.checkpoint_min:g} min; preempt_after_s {args.after_min * 60:g}",
        "",
        "| run | high: avg JCT (h) | high: max wait (h) | others: avg JCT (h) | others: max wait (h) "
        "| all: avg JCT (h) | preemptions | work lost (h) | sim time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, preempt in (("priorities, no preemption", None), ("priorities + preemption", config)):
        policy = PriorityPolicy(label, high, preempt=preempt, checkpoint_s=args.checkpoint_min * 60)
        started = time.perf_counter()
        result = simulate(jobs, policy, cluster)
        lines.append(_row(label, result, high, policy.preemptions, time.perf_counter() - started))
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    return text
