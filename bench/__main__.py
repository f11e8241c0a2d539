"""gpulab benchmarks (results in BENCHMARKS.md).

    python -m bench [--quick]            latency, footprint, replay (--quick: the < 2 minute version)
    python -m bench latency [--jobs 200] [--backlog 1000] [--profile DIR]
    python -m bench replay [--trace openb|philly] [--quick] [--nodes N] ...
    python -m bench footprint [--window 10] [--held 10000]
    python -m bench eta [--quick]        start estimates vs actual starts (replays), forecast cost
    python -m bench preempt [--trace philly|openb] [--quick]   preemption: JCT and worst wait
    python -m bench soak [--jobs 2000] [--chaos-every 2.0]   kills, freezes, Redis restarts
    python -m bench bulk [--jobs 2000]   cancel/hold/release: one call per id vs one bulk call
    python -m bench failover [--kills 10] [--schedulers 2] [--lease 3.0]   kill -9 of the leader
    python -m bench notify [--events 10000] [--users 1]      a burst of job ends through the notifier
    python -m bench memprof [--sigma 0.05]   learned --mem auto vs users' requests (openb)
    python -m bench placement [--quick] [--sizes 1000,10000,100000]   place() and run_pass() at scale
    python -m bench training [--runs 3]  the training loop under gpulab vs bare
    python -m bench dispatch [--batch 130] [--nodes 64]   one Dispatcher.dispatch(): wall, CPU (own + Redis)
    python -m bench drain [--tasks 1000] [--runs 1]   a 1,000-task array of `true` vs xargs -P 8
    python -m bench logs [--lines 40] [--flood-s 10]   job output through Redis: latency, floods, bytes
    python -m bench gate [--launches 300] [--rounds 3]   one job start in the shim's gate: C vs Python

Each writes what it printed to bench/results/ as markdown (replay also a .png).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from bench import (
    array_drain,
    bulk_actions,
    chaos_soak,
    dispatch_cost,
    eta,
    failover,
    footprint,
    latency,
    log_shipping,
    memprof,
    notify_burst,
    placement_throughput,
    shim_gate,
    training_overhead,
)
from bench.replay import preempt
from bench.replay import run as replay

RESULTS = Path(__file__).resolve().parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="latency, footprint and replay, in under two minutes")
    sub = p.add_subparsers(dest="command")
    latency.add_arguments(sub.add_parser("latency", help="submit -> start latency on a real stack"))
    replay.add_arguments(sub.add_parser("replay", help="trace replay through place() and baselines"))
    footprint.add_arguments(sub.add_parser("footprint", help="daemons' idle CPU/RSS; Redis bytes per job"))
    training_overhead.add_arguments(sub.add_parser("training", help="training loop under gpulab vs bare"))
    bulk_actions.add_arguments(sub.add_parser("bulk", help="cancel/hold/release of thousands of jobs"))
    eta.add_arguments(sub.add_parser("eta", help="start estimates: accuracy on the replays, cost at 1k/10k waiting"))
    preempt.add_arguments(sub.add_parser("preempt", help="preemption by checkpoint on the replays: JCT, worst wait"))
    chaos_soak.add_arguments(sub.add_parser("soak", help="short jobs under worker kills/freezes, Redis restarts"))
    failover.add_arguments(sub.add_parser("failover", help="kill -9 of the leading scheduler: time to a new leader"))
    notify_burst.add_arguments(sub.add_parser("notify", help="a burst of job ends through the notifier"))
    memprof.add_arguments(sub.add_parser("memprof", help="learned --mem auto vs users' requests on openb"))
    placement_throughput.add_arguments(sub.add_parser("placement", help="place() and run_pass() at 1k-100k pending"))
    dispatch_cost.add_arguments(sub.add_parser("dispatch", help="one Dispatcher.dispatch(): wall, CPU"))
    array_drain.add_arguments(sub.add_parser("drain", help="a 1,000-task array of `true` vs xargs -P 8"))
    log_shipping.add_arguments(sub.add_parser("logs", help="job output through Redis: latency, floods, bytes"))
    shim_gate.add_arguments(sub.add_parser("gate", help="one job start in the shim's gate: C vs Python"))
    return p


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    import os

    import psutil

    ram = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {ram:.0f} GiB RAM, Python {platform.python_version()}, {platform.platform()}"
    )


def save(name: str, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"Machine: {machine()}\n\n{text}\n")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    print(f"machine: {machine()}")
    started = time.perf_counter()
    if args.command == "latency":
        save("latency", latency.run(args))
    elif args.command == "footprint":
        save("footprint", footprint.run(args))
    elif args.command == "training":
        save("training_overhead", training_overhead.run(args))
    elif args.command == "soak":
        save("chaos_soak_quick" if args.quick else "chaos_soak", chaos_soak.run(args))
    elif args.command == "bulk":
        save("bulk_actions", bulk_actions.run(args))
    elif args.command == "failover":
        save("failover_quick" if args.quick else "failover", failover.run(args))
    elif args.command == "notify":
        save(f"notify_burst_{args.users}users", notify_burst.run(args))
    elif args.command == "dispatch":
        save("dispatch_cost", dispatch_cost.run(args))
    elif args.command == "drain":
        save("array_drain_quick" if args.quick else "array_drain", array_drain.run(args))
    elif args.command == "placement":
        save("placement_quick" if args.quick else "placement", placement_throughput.run(args))
    elif args.command == "eta":
        save("eta_quick" if args.quick else "eta", eta.run(args))
    elif args.command == "preempt":
        save(f"preempt_{args.trace}{'_quick' if args.quick else ''}", preempt.run(args))
    elif args.command == "logs":
        save("log_shipping", log_shipping.run(args))
    elif args.command == "gate":
        save("shim_gate", shim_gate.run(args))
    elif args.command == "replay":
        replay.run(args)
    elif args.command == "memprof":
        text = memprof.run(args)
        print(text)
        save(f"memprof_sigma{args.sigma:g}_margin{args.margin:g}", text)
    else:
        every = ["latency", "footprint", "replay"]
        for name in every:
            sub = parser().parse_args([name, *(["--quick"] if args.quick else [])])
            if name == "latency":
                save("latency_quick" if args.quick else "latency", latency.run(sub))
            elif name == "footprint":
                save("footprint_quick" if args.quick else "footprint", footprint.run(sub))
            else:
                for trace in ("openb", "philly"):
                    sub.trace = trace
                    replay.run(sub)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
