"""Simulated GPUs for machines without one: demos, tests, benchmarks.

Usage is announced, not invented: a process that "allocates" writes its byte count to
`<sim_dir>/<uuid>/<its pid>` (see `worker.sim_alloc`). The probe sums the files of live
processes, so placement, accounting and per-process attribution run the same code paths
as on a real GPU, where NVML reports (pid, bytes) too. Files are the channel because they
survive any process layout (a job's grandchild can allocate) and need no daemon.

Dead processes release their memory like a real driver would: a file whose pid has
exited (or is a zombie, or was reused by a newer process) is ignored and removed.
`<sim_dir>/<uuid>/FAIL` holding a message turns that GPU unhealthy, for failure tests.

Utilisation: a file may hold `BYTES UTIL` (UTIL in percent, 0-100); the GPU reports the
highest UTIL of its live processes, 100 for a process that gives none (it computes), and 0
with no process: so idle-job detection is testable (`python -m worker.sim_alloc --util 0`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from jobs.gpus import GpuDevice, GpuProcess, GpuSnapshot
from jobs.sizes import parse_size
from worker.jobfiles import read_small_file

SIM_NAME = "Simulated GPU"
FAIL_FILE = "FAIL"
MAX_SIM_GPUS = 64
# A file written before its pid's process started belongs to an earlier process with the
# same pid. Process start times are derived from the boot time (whole seconds) and clock
# ticks, so allow a few seconds of disagreement with file times.
_PID_REUSE_SLACK_S = 5.0

_MAX_SIM_FILE = 4096

_COUNT_RE = re.compile(r"^\s*(?P<count>[0-9]+)\s*[xX]\s*(?P<size>.+)$")


def sim_uuid(node: str, index: int) -> str:
    """The uuid of simulated GPU `index` on `node` (unique across nodes sharing one sim dir)."""
    return f"GPU-sim-{node}-{index}"


def parse_sim_gpus(spec: str | Iterable[str | int]) -> list[int]:
    """Sizes in bytes from `"2x24GiB"`, `"24GiB,16GiB"`, `["24GiB", "24GiB"]` or mixes of them."""
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    sizes: list[int] = []
    for item in items:
        match = _COUNT_RE.match(item)
        count, size_text = (int(match["count"]), match["size"]) if match else (1, item)
        if count < 1:
            raise ValueError(f"invalid simulated GPUs {item!r}: the count before 'x' must be at least 1")
        size = parse_size(size_text.strip())
        sizes.extend([size] * count)
        if len(sizes) > MAX_SIM_GPUS:
            raise ValueError(f"invalid simulated GPUs {spec!r}: at most {MAX_SIM_GPUS} per node")
    if not sizes:
        raise ValueError("no simulated GPUs given: accepted forms are 2x24GiB, 24GiB,16GiB or a list of sizes")
    return sizes


def mark_failed(sim_dir: Path, uuid: str, message: str) -> None:
    """Make simulated GPU `uuid` report unhealthy with `message` (until `clear_failed`)."""
    path = Path(sim_dir) / uuid
    path.mkdir(parents=True, exist_ok=True)
    (path / FAIL_FILE).write_text(message)


def clear_failed(sim_dir: Path, uuid: str) -> None:
    (Path(sim_dir) / uuid / FAIL_FILE).unlink(missing_ok=True)


def pid_alive(pid: int, since: float | None = None) -> bool:
    """True if `pid` runs and is not a zombie; with `since`, also started no later than that."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return since is None or proc.create_time() <= since + _PID_REUSE_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's live process


class SimProbe:
    """GpuProbe over simulated GPUs of the given sizes; usage comes from `sim_dir` files."""

    def __init__(self, node: str, sizes: list[int], sim_dir: Path) -> None:
        if not sizes:
            raise ValueError("SimProbe needs at least one GPU size")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"simulated GPU sizes must be positive, got {sizes}")
        self.node = node
        self.sizes = list(sizes)
        self.sim_dir = Path(sim_dir)
        self.uuids = [sim_uuid(node, i) for i in range(len(sizes))]
        for uuid in self.uuids:
            (self.sim_dir / uuid).mkdir(parents=True, exist_ok=True)

    def snapshot(self) -> GpuSnapshot:
        devices = tuple(self._read(i) for i in range(len(self.sizes)))
        return GpuSnapshot(devices=devices, taken_at=time.time(), driver="simulated")

    def close(self) -> None:
        """Nothing to release: the files belong to the allocating processes."""

    def _read(self, index: int) -> GpuDevice:
        uuid, total = self.uuids[index], self.sizes[index]
        folder = self.sim_dir / uuid
        error = _read_fail(folder)
        if error is not None:
            return GpuDevice(
                index=index, uuid=uuid, name=SIM_NAME, total_bytes=total, free_bytes=0, used_bytes=0,
                utilization_pct=None, healthy=False, error=error,
            )  # fmt: skip
        utils: list[int] = []
        processes = tuple(_live_allocations(folder, utils))
        used = sum(p.used_bytes for p in processes)
        return GpuDevice(
            index=index,
            uuid=uuid,
            name=SIM_NAME,
            total_bytes=total,
            free_bytes=max(0, total - used),
            used_bytes=used,  # may exceed total: oversubscription stays visible
            utilization_pct=max(utils, default=0),
            processes=processes,
        )


def _read_fail(folder: Path) -> str | None:
    path = folder / FAIL_FILE
    if not os.path.lexists(path):
        return None
    # Jobs write into the sim dir: read without following or blocking (a FIFO must not hang
    # the worker's heartbeat), and only a small regular file.
    data = read_small_file(path, _MAX_SIM_FILE)
    if data is None:
        return "simulated failure (unreadable FAIL file)"
    return data.decode(errors="replace").strip() or "simulated failure"


def _live_allocations(folder: Path, utils: list[int] | None = None) -> list[GpuProcess]:
    """(pid, bytes) of live allocating processes, sorted by pid; removes dead ones' files.
    Each one's utilisation (percent, 100 when its file gives none) goes into `utils`."""
    found: list[GpuProcess] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue  # FAIL, temp files of writers in progress
        pid = int(entry.name)
        try:
            written_at = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # its process removed it just now
        if not pid_alive(pid, since=written_at):
            Path(entry.path).unlink(missing_ok=True)
            continue
        data = read_small_file(entry.path, _MAX_SIM_FILE)  # not following, never blocking
        words = (data or b"").split()
        try:
            used = int(words[0])
            util = min(100, max(0, int(words[1]))) if len(words) > 1 else 100
        except (ValueError, IndexError):
            continue  # removed meanwhile, not a regular file, or not a number: count nothing
        found.append(GpuProcess(pid=pid, used_bytes=max(0, used)))
        if utils is not None:
            utils.append(util)
    found.sort(key=lambda p: p.pid)
    return found
