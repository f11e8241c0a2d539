"""Turn the public GPU-cluster traces (openb, Philly; TRACE_DIR below) into `SimJob`s. Every mapping the traces do not
give us is an assumption, stated in ASSUMPTIONS (printed with the results).

openb (Alibaba GPU cluster, ATC'23): a fractional `gpu_milli` becomes a memory request of
`gpu_milli / 1000 x card memory` (assumption); 1000 = a whole GPU. Arrival = creation_time,
run time = deletion_time - scheduled_time. Pods still Running at the end have the trace's
cut-off as deletion_time, so their run time is a lower bound; they are kept as they are.
Pods that never started (no scheduled_time) have no run time and are dropped, as are pods
without GPUs.

Philly (Microsoft, via Petuum adaptdl): arrivals and durations as given, one virtual cluster
(6214e9, the largest: 41k jobs, all within 8 GPUs). No memory in the trace: per-GPU memory is
drawn (seeded) from a distribution shaped on Lucid (ASPLOS'23), which profiled 66 PyTorch
training configurations: 50 use under 4 GB, 59 under 8 GB, the smallest about 2 GB. So:
2-4 GiB with p=50/66, 4-8 GiB with p=9/66, 8-20 GiB with p=7/66 (20 GiB cap is ours),
uniform within each band, rounded up to 256 MiB.
"""

from __future__ import annotations

import csv
import random
from datetime import UTC, datetime
from pathlib import Path

from bench.replay.sim import GiB, SimJob

TRACE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
OPENB_PODS = "openb_pod_list_default.csv"
PHILLY = "philly_pollux.csv"
PHILLY_CLUSTER = "6214e9"
MiB = 2**20
MEM_STEP = 256 * MiB
# (probability, low GiB, high GiB) per band, from Lucid's 66 profiled configurations.
Row = tuple[float, int, int, int | None, float]  # arrival, order in the file, gpus, mem, run time
LUCID_BANDS = ((50 / 66, 2.0, 4.0), (9 / 66, 4.0, 8.0), (7 / 66, 8.0, 20.0))

ASSUMPTIONS = {
    "openb": [
        "memory request = gpu_milli/1000 x card memory (assumption; the trace has no memory); "
        "gpu_milli=1000 = a whole GPU (gpulab: no --mem)",
        "arrival = creation_time; run time = deletion_time - scheduled_time",
        "pods still Running at the trace's end keep the cut-off as their end (run time is a lower bound)",
        "pods that never started (no scheduled_time) and pods without GPUs are dropped",
        "actual memory use = request (so packing by request never OOMs)",
    ],
    "philly": [
        f"virtual cluster {PHILLY_CLUSTER} only (largest; every job within 8 GPUs)",
        "per-GPU memory drawn from Lucid (ASPLOS'23) 66 configs: 2-4 GiB p=50/66, 4-8 GiB p=9/66, "
        "8-20 GiB p=7/66 (the 20 GiB cap is ours), uniform in each band, rounded up to 256 MiB; seeded",
        "GB in Lucid taken as GiB; actual memory use = request",
    ],
}


def _round_up(n: float, step: int = MEM_STEP) -> int:
    return int(-(-n // step) * step)


def load_openb(card_bytes: int = 16 * GiB, trace_dir: Path = TRACE_DIR) -> list[SimJob]:
    rows: list[Row] = []
    with open(trace_dir / OPENB_PODS, newline="") as f:
        for order, row in enumerate(csv.DictReader(f)):
            gpus = int(row["num_gpu"])
            if gpus == 0 or not row["scheduled_time"]:
                continue
            milli = int(row["gpu_milli"])
            mem = None if milli >= 1000 else _round_up(milli / 1000 * card_bytes, MiB)
            duration = float(row["deletion_time"]) - float(row["scheduled_time"])
            rows.append((float(row["creation_time"]), order, gpus, mem, max(duration, 1.0)))
    return _jobs(rows)


def lucid_mem(rng: random.Random) -> int:
    u = rng.random()
    for p, low, high in LUCID_BANDS:
        if u < p:
            return _round_up(rng.uniform(low, high) * GiB)
        u -= p
    return _round_up(LUCID_BANDS[-1][2] * GiB)


def load_philly(
    cluster: str = PHILLY_CLUSTER, seed: int = 0, max_gpus: int = 8, trace_dir: Path = TRACE_DIR
) -> list[SimJob]:
    rng = random.Random(seed)
    rows: list[Row] = []
    with open(trace_dir / PHILLY, newline="") as f:
        for order, row in enumerate(csv.DictReader(f)):
            if row["cluster"] != cluster or int(row["num_gpus"]) > max_gpus or float(row["duration"]) <= 0:
                continue
            at = datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC).timestamp()
            rows.append((at, order, int(row["num_gpus"]), lucid_mem(rng), float(row["duration"])))
    return _jobs(rows)


def _jobs(rows: list[Row]) -> list[SimJob]:
    rows.sort(key=lambda r: (r[0], r[1]))
    t0 = rows[0][0] if rows else 0.0
    return [SimJob(i + 1, at - t0, dur, gpus, mem) for i, (at, _, gpus, mem, dur) in enumerate(rows)]


def compress(jobs: list[SimJob], factor: float) -> list[SimJob]:
    """Arrivals `factor` times denser (inter-arrival gaps divided by it); run times unchanged."""
    if factor == 1:
        return jobs
    return [SimJob(j.id, j.arrival / factor, j.duration, j.gpus, j.mem, j.usage) for j in jobs]


def window(jobs: list[SimJob], days: float) -> list[SimJob]:
    """The jobs that arrive within the first `days` days."""
    return [j for j in jobs if j.arrival < days * 86400]
