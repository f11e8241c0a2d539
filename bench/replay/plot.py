"""Plots of a replay: JCT CDF and requested GPU memory over time, one line per policy.
matplotlib is optional (the `bench` extra); without it the plot is skipped."""

from __future__ import annotations

import itertools
from pathlib import Path

from bench.replay.sim import SimResult

BINS = 300


def _binned(timeline: list[tuple[float, float, int]], bins: int) -> tuple[list[float], list[float]]:
    """Time-weighted mean of the step function `timeline` over `bins` equal spans (x in days)."""
    if len(timeline) < 2:
        return [], []
    t0, t1 = timeline[0][0], timeline[-1][0]
    width = (t1 - t0) / bins or 1.0
    sums = [0.0] * bins
    for (t, value, _), (t_next, _, _) in itertools.pairwise(timeline):
        b = min(int((t - t0) / width), bins - 1)
        while t < t_next:
            edge = t_next if b == bins - 1 else min(t_next, t0 + (b + 1) * width)
            sums[b] += value * max(0.0, edge - t)
            t = max(t, edge)
            b = min(b + 1, bins - 1)
    xs = [(t0 + (b + 0.5) * width) / 86400 for b in range(bins)]
    return xs, [s / width for s in sums]


def plot(results: list[SimResult], title: str, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'gpulab[bench]'); no plot written")
        return None
    fig, (cdf, util) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in results:
        jcts = sorted(j.jct / 3600 for j in r.jobs)
        n = len(jcts)
        cdf.plot(jcts, [(i + 1) / n for i in range(n)], label=r.policy, linewidth=1.2)
        xs, ys = _binned(r.timeline, BINS)
        util.plot(xs, [100 * y for y in ys], label=r.policy, linewidth=0.9)
    cdf.set_xscale("log")
    cdf.set_xlabel("job completion time (hours, log scale)")
    cdf.set_ylabel("fraction of jobs")
    cdf.set_title("JCT CDF")
    cdf.grid(True, which="both", alpha=0.3)
    arrivals = sorted(j.job.arrival for j in results[0].jobs) if results else []
    if arrivals:  # skip the quiet lead-in of long-lived early jobs: start at the 2% arrival
        util.set_xlim(left=arrivals[len(arrivals) // 50] / 86400)
    util.set_xlabel("time (days)")
    util.set_ylabel("GPU memory requested by running jobs (% of capacity)")
    util.set_title(f"memory in use by request (time-weighted, {BINS} bins)")
    util.grid(True, alpha=0.3)
    cdf.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
