"""Learned requests (`--mem auto`) against users' own guesses, on the openb trace.

    python -m bench memprof [--sigma 0.05] [--seed 0] [--nodes 6] [--card-gib 16]

openb (Alibaba, ATC'23) gives every pod's request (`gpu_milli` of a card), arrival, start
and end, but no measured usage, and no program. So, stated as assumptions (printed with the
results):

- "the same job" = pods of one shape: (cpu_milli, memory_mib, num_gpu, gpu_milli, gpu_spec);
- each shape's typical peak is its request x f, f drawn once per shape uniform in
  [f_low, f_high] (users over-ask; the trace cannot say by how much);
- each run's peak is that typical peak x exp(N(0, sigma)), at most the card: runs vary;
- a run learns from the runs of its shape that ended (trace end) before it arrived, the
  last `window` of them, through gpulab's own `jobs.profiles.learn` (p95 + 10%, 3 runs at
  least); before that it asks for the user's request, as `--mem auto` falls back to.

Then both request sets are replayed through the same simulator and the gpulab policy as
`python -m bench replay` (bench/replay/sim.py), each job using its drawn peak: a job
*over its request* is one whose peak exceeds what it reserved (what enforcement acts on);
a job that *would OOM* is one placed on a card whose use then exceeded it.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from bench.replay import traces
from bench.replay.gpulab_policy import GpulabPolicy
from bench.replay.metrics import summarise
from bench.replay.sim import GiB, SimJob, simulate
from jobs.config import PolicyConfig, SchedulerConfig
from jobs.profiles import LearnPolicy, Sample, learn
from jobs.sizes import MiB


@dataclass(frozen=True)
class Run:
    order: int
    shape: tuple[str, ...]
    arrival: float
    end: float
    duration: float
    gpus: int
    request: int | None  # the user's: None = a whole card
    peak: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sigma", type=float, default=0.05, help="run-to-run spread of peaks (lognormal sigma)")
    p.add_argument("--f-low", type=float, default=0.3, help="typical peak / request, lowest")
    p.add_argument("--f-high", type=float, default=0.9, help="typical peak / request, highest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--card-gib", type=int, default=16)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--quantile", type=float, default=LearnPolicy.quantile, help="default: [memory] auto_quantile")
    p.add_argument("--margin", type=float, default=LearnPolicy.margin, help="default: [memory] auto_margin")
    p.add_argument("--out", type=Path, default=None)


def load_runs(card: int, sigma: float, f_low: float, f_high: float, seed: int) -> list[Run]:
    rng = random.Random(seed)
    typical: dict[tuple[str, ...], float] = {}
    runs: list[Run] = []
    with open(traces.TRACE_DIR / traces.OPENB_PODS, newline="") as f:
        for order, row in enumerate(csv.DictReader(f)):
            gpus = int(row["num_gpu"])
            if gpus == 0 or not row["scheduled_time"]:
                continue
            milli = int(row["gpu_milli"])
            request = None if milli >= 1000 else -(-int(milli / 1000 * card) // MiB) * MiB
            shape = (row["cpu_milli"], row["memory_mib"], row["num_gpu"], row["gpu_milli"], row["gpu_spec"])
            if shape not in typical:
                typical[shape] = rng.uniform(f_low, f_high)
            base = (request if request is not None else card) * typical[shape]
            peak = min(card, int(base * math.exp(rng.gauss(0.0, sigma))))
            start, end = float(row["scheduled_time"]), float(row["deletion_time"])
            duration = max(end - start, 1.0)
            runs.append(Run(order, shape, float(row["creation_time"]), end, duration, gpus, request, peak))
    runs.sort(key=lambda r: (r.arrival, r.order))
    return runs


def learned_requests(runs: list[Run], policy: LearnPolicy, window: int, most: int) -> list[int | None]:
    """Each run's request under `--mem auto`: learned from its shape's runs that ended before it
    arrived, else the user's own. A learned request over `most` (what a card offers) is a whole
    card, as the scheduler does at submit."""
    by_end = sorted(range(len(runs)), key=lambda i: runs[i].end)
    history: dict[tuple[str, ...], deque[Sample]] = defaultdict(lambda: deque(maxlen=window))
    done = 0
    requests: list[int | None] = []
    for run in runs:
        while done < len(by_end) and runs[by_end[done]].end <= run.arrival:
            past = runs[by_end[done]]
            history[past.shape].append(Sample(past.order, 1, past.peak, past.end))
            done += 1
        got = learn(list(history[run.shape]), policy)
        if got is None:
            requests.append(run.request)
        else:
            requests.append(got.request if got.request <= most else None)
    return requests


def run(args: argparse.Namespace) -> str:
    card = args.card_gib * GiB
    started = time.perf_counter()
    runs = load_runs(card, args.sigma, args.f_low, args.f_high, args.seed)
    policy = LearnPolicy(quantile=args.quantile, margin=args.margin)
    headroom = SchedulerConfig().headroom_bytes
    learned = learned_requests(runs, policy, args.window, card - headroom)
    cluster = [[card] * args.gpus_per_node for _ in range(args.nodes)]
    lines = [
        f"openb: {len(runs)} jobs, {len({r.shape for r in runs})} job shapes (profiles); cluster {args.nodes} nodes x "
        f"{args.gpus_per_node} GPUs x {args.card_gib} GiB; peaks: typical = request x U({args.f_low}, {args.f_high}) "
        f"per shape, each run x exp(N(0, {args.sigma})); learned = p{policy.quantile * 100:g} + "
        f"{policy.margin * 100:g}% of the last {args.window} runs that ended, from {policy.min_runs} runs",
        "",
        "| requests | jobs learned | over their request | would OOM (card) | median reserved/peak "
        "| p90 reserved/peak | avg JCT (h) | mean wait (h) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, requests in (("users' guesses", [r.request for r in runs]), ("learned (--mem auto)", learned)):
        pairs = enumerate(zip(runs, requests, strict=True))
        jobs = [SimJob(i, r.arrival, r.duration, r.gpus, req, r.peak) for i, (r, req) in pairs]
        result = simulate(jobs, GpulabPolicy("gpulab", config=PolicyConfig()), cluster)
        summary = summarise(result)
        reserved = [card if req is None else req for req in requests]
        ratios = [res / r.peak for res, r in zip(reserved, runs, strict=True) if r.peak > 0]
        over = sum(1 for res, r in zip(reserved, runs, strict=True) if r.peak > res)
        changed = [req != r.request for req, r in zip(requests, runs, strict=True)]
        n_learned = sum(changed) if requests is learned else 0
        ordered = sorted(ratios)
        lines.append(
            f"| {name} | {n_learned} | {over} ({over / len(runs):.2%}) | {summary.oom} ({summary.oom / len(runs):.2%}) "
            f"| {statistics.median(ratios):.3f} | {ordered[int(0.9 * len(ordered))]:.3f} "
            f"| {summary.avg_jct_s / 3600:.2f} | {summary.mean_wait_s / 3600:.2f} |"
        )
    only = [i for i, (req, r) in enumerate(zip(learned, runs, strict=True)) if req != r.request]
    if only:
        mine = sorted(learned[i] / runs[i].peak for i in only if runs[i].peak > 0)  # type: ignore[operator]
        theirs = sorted((runs[i].request or card) / runs[i].peak for i in only if runs[i].peak > 0)
        over = sum(1 for i in only if runs[i].peak > (learned[i] or card))
        lines += [
            "",
            f"The {len(only)} jobs that had a learned request: median reserved/peak {statistics.median(mine):.3f} "
            f"learned vs {statistics.median(theirs):.3f} their users' guesses; {over} ({over / len(only):.2%}) "
            "over their learned request.",
        ]
    lines.append(f"\n(computed in {time.perf_counter() - started:.1f} s)")
    return "\n".join(lines)
