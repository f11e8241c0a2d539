"""NVML (what gpulab places against) vs CUDA's own view (torch.cuda.mem_get_info), per GPU.

    python scripts/nvml_vs_torch.py [--alloc 2GiB] [--json out.json]

Three stages: before any CUDA context, after torch created one on every GPU, and after
allocating --alloc on every GPU. For each it prints NVML total/free/used next to torch's
free/total and the difference, plus what NVML attributes to this pid. The numbers go in
BENCHMARKS.md: they size the scheduler's headroom (context overhead, NVML vs CUDA drift).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # torch index i == NVML index i
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _key(uuid: object) -> str:
    """torch prints a bare uuid, NVML prefixes `GPU-`: compare the hex digits."""
    return str(uuid).strip().lower().removeprefix("gpu-")


def _row(stage: str, dev: Any, torch_free: int | None, torch_total: int | None) -> dict[str, Any]:
    mine = sum(p.used_bytes for p in dev.processes if p.pid == os.getpid())
    return {
        "stage": stage,
        "index": dev.index,
        "uuid": dev.uuid,
        "nvml_total": dev.total_bytes,
        "nvml_free": dev.free_bytes,
        "nvml_used": dev.used_bytes,
        "torch_free": torch_free,
        "torch_total": torch_total,
        "free_diff": None if torch_free is None else dev.free_bytes - torch_free,
        "nvml_own_pid": mine,
    }


def _measure(stage: str, probe: Any, torch: Any, by_uuid: dict[str, int] | None) -> list[dict[str, Any]]:
    rows = []
    for dev in probe.snapshot().devices:
        torch_free = torch_total = None
        if by_uuid is not None and _key(dev.uuid) in by_uuid:
            torch_free, torch_total = torch.cuda.mem_get_info(by_uuid[_key(dev.uuid)])
        rows.append(_row(stage, dev, torch_free, torch_total))
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    from jobs.sizes import format_size

    def fmt(v: int | None) -> str:
        return "-" if v is None else format_size(v)

    head = ("stage", "gpu", "nvml total", "nvml free", "nvml used", "torch free", "torch total", "free diff", "own pid")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["stage"], str(r["index"])] + [
            fmt(r[k]) for k in ("nvml_total", "nvml_free", "nvml_used", "torch_free", "torch_total", "free_diff")
        ]
        cells.append(fmt(r["nvml_own_pid"]))
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description="Compare NVML and torch memory readings per GPU.")
    parser.add_argument("--alloc", default="2GiB", help="bytes to allocate on every GPU (default 2GiB)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    from jobs.sizes import parse_size
    from worker.nvml_probe import GpuProbeError, NvmlProbe

    alloc = parse_size(args.alloc)
    try:
        probe = NvmlProbe()
    except GpuProbeError as exc:
        print(exc, file=sys.stderr)
        return 1
    import torch

    if not torch.cuda.is_available():
        print(f"torch {torch.__version__} cannot use CUDA here", file=sys.stderr)
        return 1

    rows = _measure("no context", probe, torch, None)
    by_uuid = {}
    for i in range(torch.cuda.device_count()):
        by_uuid[_key(torch.cuda.get_device_properties(i).uuid)] = i
        torch.cuda.mem_get_info(i)  # creates the context on device i
    rows += _measure("context", probe, torch, by_uuid)
    blocks = [torch.empty(alloc, dtype=torch.uint8, device=f"cuda:{i}") for i in by_uuid.values()]
    for b in blocks:
        b.fill_(1)
    torch.cuda.synchronize()
    rows += _measure(f"+{args.alloc}", probe, torch, by_uuid)

    n = 200
    start = time.perf_counter()
    for _ in range(n):
        probe.snapshot()
    per_snapshot_ms = (time.perf_counter() - start) / n * 1000
    probe.close()

    print(f"driver {probe.driver}, torch {torch.__version__}, pid {os.getpid()}")
    _print(rows)
    from jobs.sizes import format_size

    for key in by_uuid:
        ctx, base, after = (next(r for r in rows if r["stage"] == s and _key(r["uuid"]) == key)
                            for s in ("context", "no context", f"+{args.alloc}"))  # fmt: skip
        print(
            f"{base['uuid']}: context costs {format_size(ctx['nvml_used'] - base['nvml_used'])} (NVML used), "
            f"{args.alloc} allocation shows as {format_size(after['nvml_used'] - ctx['nvml_used'])}; "
            f"this pid holds {format_size(after['nvml_own_pid'])} per NVML"
        )
    print(f"NvmlProbe.snapshot(): {per_snapshot_ms:.2f} ms for {probe.device_count} GPU(s)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "snapshot_ms": per_snapshot_ms}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
