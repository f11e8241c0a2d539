"""`python -m bench replay`: replay a trace through every policy on one cluster; print a
markdown table, write it and a plot to bench/results/."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from bench.replay import traces
from bench.replay.gpulab_policy import GpulabPolicy
from bench.replay.metrics import Summary, summarise, table
from bench.replay.plot import plot
from bench.replay.policies import BestFit, EasyBackfill, FifoExclusive, TaskSpooler
from bench.replay.sim import GiB, Policy, SimJob, SimResult, simulate

RESULTS = Path(__file__).resolve().parents[1] / "results"
# Per trace: (nodes, card GiB, start day, days) by default and with --quick. Sized so that
# jobs queue: openb's pods never had more than 71 GPUs busy at once; Philly's VC ~38 on average.
DEFAULTS = {"openb": (6, 16, 0.0, 0.0), "philly": (8, 24, 0.0, 0.0)}
QUICK = {"openb": (6, 16, 0.0, 0.0), "philly": (3, 24, 28.0, 2.0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", choices=sorted(DEFAULTS), default="openb")
    p.add_argument("--nodes", type=int, help="nodes in the simulated cluster (default per trace)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--card-gib", type=int, help="memory of every GPU (default: openb 16, philly 24)")
    p.add_argument("--compress", type=float, default=1.0, help="divide inter-arrival gaps by this")
    p.add_argument("--start-day", type=float, help="replay jobs arriving from this day of the trace")
    p.add_argument("--days", type=float, help="... for this many days (0: to the end)")
    p.add_argument("--seed", type=int, default=0, help="Philly memory draw")
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help="run only this policy (repeatable); names may contain commas: --policy 'gpulab, no reservation'",
    )
    p.add_argument(
        "--policies",
        help="comma-separated subset of policy names; a name with commas is matched whole "
        "('best-fit,gpulab, no reservation' selects both)",
    )
    p.add_argument("--quick", action="store_true", help="a shorter window where the trace is long")
    p.add_argument("--out", type=Path, default=RESULTS)


def policies(names: list[str] | None) -> list[Policy]:
    from jobs.config import PolicyConfig

    base = PolicyConfig()
    have = {f.name for f in dataclasses.fields(PolicyConfig)}

    def variant(**changes: Any) -> PolicyConfig:
        return dataclasses.replace(base, **{k: v for k, v in changes.items() if k in have})

    every: list[Policy] = [
        FifoExclusive(),
        TaskSpooler(),
        EasyBackfill(),
        BestFit(),
        GpulabPolicy("gpulab", config=base),
        GpulabPolicy("gpulab, no --time", config=base, time_limits=False),
        GpulabPolicy("gpulab, no reservation", config=variant(max_reservations=0)),
        GpulabPolicy("gpulab, fair share off", config=variant(weight_fairshare=0.0)),
    ]
    if not names:
        return every
    wanted = set(names)
    unknown = sorted(wanted - {p.name for p in every})
    if unknown:
        known = "; ".join(p.name for p in every)
        print(f"bench replay: unknown policy {unknown[0]!r} (known: {known})", file=sys.stderr)
        raise SystemExit(2)
    return [p for p in every if p.name in wanted]


def policy_names(policy: list[str] | None, policies: str | None) -> list[str] | None:
    """The names `--policy` (whole, repeatable) and `--policies` (a comma-separated list)
    select. Names contain commas ("gpulab, no reservation"), so the list is split on commas
    and neighbouring pieces are joined again wherever together they make a known name."""
    chosen = [n.strip() for n in policy or []]
    if policies:
        known = {p.name for p in ALL_NAMES}
        pieces = [piece.strip() for piece in policies.split(",")]
        start = 0
        while start < len(pieces):
            # the longest run of pieces from `start` that forms a known name, else one piece
            end = next((e for e in range(len(pieces), start, -1) if ", ".join(pieces[start:e]) in known), start + 1)
            chosen.append(", ".join(pieces[start:end]))
            start = end
    return chosen or None


ALL_NAMES = policies(None)


def load(args: argparse.Namespace) -> tuple[list[SimJob], list[list[int]], str]:
    nodes, card, start, days = (QUICK if args.quick else DEFAULTS)[args.trace]
    nodes = args.nodes or nodes
    card = args.card_gib or card
    start = start if args.start_day is None else args.start_day
    days = days if args.days is None else args.days
    jobs = traces.load_openb(card * GiB) if args.trace == "openb" else traces.load_philly(seed=args.seed)
    if start or days:
        jobs = [j for j in jobs if j.arrival >= start * 86400 and (not days or j.arrival < (start + days) * 86400)]
    jobs = traces.compress(jobs, args.compress)
    cluster = [[card * GiB] * args.gpus_per_node for _ in range(nodes)]
    where = f"days {start:g} to {start + days:g} of the trace" if days else f"from day {start:g}" if start else ""
    setup = (
        f"{args.trace}: {len(jobs)} jobs{', ' + where if where else ''}; cluster {nodes} nodes x "
        f"{args.gpus_per_node} GPUs x {card} GiB; arrivals compressed x{args.compress:g}"
    )
    return jobs, cluster, setup


def run(args: argparse.Namespace) -> list[Summary]:
    jobs, cluster, setup = load(args)
    print(f"replay {setup}")
    results: list[SimResult] = []
    summaries: list[Summary] = []
    for policy in policies(policy_names(args.policy, args.policies)):
        started = time.perf_counter()
        result = simulate(jobs, policy, cluster)
        summaries.append(summarise(result, time.perf_counter() - started))
        results.append(result)
        print(f"  {policy.name}: {summaries[-1].sim_s:.2f} s", flush=True)
    text = table(summaries)
    notes = "\n".join(f"- {a}" for a in traces.ASSUMPTIONS[args.trace])
    report = f"{setup}\n\n{text}\n\nAssumptions:\n{notes}\n"
    print("\n" + report)
    suffix = f"{args.trace}{'_quick' if args.quick else ''}_{len(cluster)}n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"replay_{suffix}.md").write_text(report)
    png = plot(results, setup, args.out / f"replay_{suffix}.png")
    if png is not None:
        print(f"plot: {png}")
    return summaries
