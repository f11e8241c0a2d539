"""`python -m bench gate`: what one job start costs in the shim's gate, C against Python.

The shim forks the job's command early and holds it at a gate until the worker's go
(worker/shim.py). The C gate (worker/native/gate.c) runs no Python between fork and exec;
the Python gate (`Shim.child_side`) does. This runs `Shim.prepare` + `Shim.release_child` of
`true` (the command's environment: this process's) N times per gate, alternating the gates
for R rounds, in a child process that is a shim as the fork server makes them
(`python -I -S`, the shim imported by path). Per launch: the command's CPU from fork to its
exit (RUSAGE_CHILDREN: user + system), its minor page faults, the shim's own CPU, and wall
time. `true` itself costs the same under both: the difference is the gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "worker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launches", type=int, default=300, help="launches per gate per round (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each gate once per round (default 3)")


def run(args: argparse.Namespace) -> str:
    done = subprocess.run(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), str(args.launches), str(args.rounds)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    lines = [
        f"The shim's gate: {args.launches} launches of `true` per gate per round, {args.rounds} rounds, alternated",
        "",
        "| round | gate | command CPU ms | command minor faults | shim CPU ms | total CPU ms | wall ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        total = row["child_ms"] + row["shim_ms"]
        lines.append(
            f"| {row['round']} | {row['gate']} | {row['child_ms']:.2f} | {row['faults']:.0f} | {row['shim_ms']:.2f} "
            f"| {total:.2f} | {row['wall_ms']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


def measure(launches: int, rounds: int) -> None:
    """In the child: a shim's interpreter (-I -S), the shim module by path."""
    import resource
    import time

    sys.path.insert(0, WORKER)
    import shim

    native = shim.NATIVE_GATE
    if native is None:
        raise SystemExit(f"the C gate is not built or not trusted ({shim.NATIVE_GATE_PATH}): run scripts/bootstrap")
    values = {"node": "bench", "job": "1", "attempt": "1", "worker-pid": str(os.getppid()), "lease-ttl": "30"}
    probe = shim.Shim(shim.Options.from_values({**values, "kill-grace": "1", "report-fd": "2"}))
    launch = {"cwd": "/", "argv": ["true"], "env": dict(os.environ)}
    for round_no in range(1, rounds + 1):
        for gate in ("C", "Python"):
            shim.NATIVE_GATE = native if gate == "C" else None
            before, own, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time(), time.perf_counter()
            for _ in range(launches):
                failure = probe.prepare(launch) or probe.release_child()
                if failure:
                    raise SystemExit(failure)
                os.waitpid(probe.child, 0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            child_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            row = {
                "round": round_no,
                "gate": gate,
                "child_ms": 1000 * child_s / launches,
                "faults": (after.ru_minflt - before.ru_minflt) / launches,
                "shim_ms": 1000 * (time.process_time() - own) / launches,
                "wall_ms": 1000 * (time.perf_counter() - wall) / launches,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    measure(int(sys.argv[1]), int(sys.argv[2]))
