"""A stand-in for a CUDA program on simulated GPUs: "allocates" memory by announcing it.

    python -m worker.sim_alloc 4GiB [--gpu UUID] [--sim-dir DIR] [--hold S | --until-signal]
                               [--steps N] [--step-interval S] [--delay S] [--all-visible] [--util PCT]

It writes its byte count to `<sim_dir>/<uuid>/<own pid>` (atomically: temp file + rename),
which `SimProbe` reports as this pid's usage, prints `allocated <bytes> on <uuid>` once
the full amount is written (tests and demos wait for that line instead of sleeping), holds
it, removes the file and exits 0 on normal exit, SIGTERM or SIGINT. After `kill -9` the
probe's dead-pid rule frees the memory, as a driver would.

The GPU defaults to the first entry of `CUDA_VISIBLE_DEVICES` (what the worker sets for
a job), the directory to `$GPULAB_SIM_DIR`. `--delay` and `--steps` imitate a job that
starts before it allocates, or grows: the case where NVML free memory alone double-books.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from jobs.sizes import parse_size


class _Stop(Exception):
    """Raised by the signal handler so that `finally` blocks release the allocation."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker.sim_alloc", description="Announce a simulated GPU allocation.")
    p.add_argument("size", help="bytes to allocate per GPU, e.g. 4GiB")
    p.add_argument(
        "--gpu",
        action="append",
        default=[],
        metavar="UUID",
        help="simulated GPU uuid (repeatable); default: first of CUDA_VISIBLE_DEVICES",
    )
    p.add_argument("--all-visible", action="store_true", help="allocate on every GPU in CUDA_VISIBLE_DEVICES")
    p.add_argument(
        "--sim-dir",
        default=os.environ.get("GPULAB_SIM_DIR", ""),
        help="simulation directory (default: $GPULAB_SIM_DIR)",
    )
    hold = p.add_mutually_exclusive_group()
    hold.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the allocation this long, then release and exit (default 0)",
    )
    hold.add_argument("--until-signal", action="store_true", help="keep the allocation until SIGTERM/SIGINT")
    p.add_argument("--steps", type=int, default=1, help="reach SIZE in N equal steps (default 1)")
    p.add_argument("--step-interval", type=float, default=0.2, metavar="SECONDS", help="time between steps")
    p.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="wait before allocating anything")
    p.add_argument("--util", type=int, default=None, metavar="PCT", help="GPU utilisation to report (default 100)")
    return p


def _targets(args: argparse.Namespace) -> list[str]:
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if args.gpu:
        return list(args.gpu)
    if args.all_visible:
        return visible
    return visible[:1]


def _write(path: Path, nbytes: int, util: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{nbytes}\n" if util is None else f"{nbytes} {util}\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        parser.error(f"SIZE: {exc}")
    if args.util is not None and not 0 <= args.util <= 100:
        parser.error("--util must be between 0 and 100")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if min(args.hold, args.step_interval, args.delay) < 0:
        parser.error("--hold, --step-interval and --delay must not be negative")
    if not args.sim_dir:
        parser.error("no simulation directory: pass --sim-dir or set GPULAB_SIM_DIR")
    uuids = _targets(args)
    if not uuids:
        parser.error("no GPU: pass --gpu UUID or set CUDA_VISIBLE_DEVICES")
    folders = [Path(args.sim_dir) / uuid for uuid in uuids]
    for uuid, folder in zip(uuids, folders, strict=True):
        if not folder.is_dir():
            parser.error(f"no simulated GPU {uuid} in {args.sim_dir} (is a worker with --sim-gpus running?)")

    files = [folder / str(os.getpid()) for folder in folders]
    try:
        if args.delay:
            time.sleep(args.delay)
        for step in range(1, args.steps + 1):
            amount = size * step // args.steps
            for path in files:
                _write(path, amount, args.util)
            if step < args.steps:
                print(f"step {step}/{args.steps}: {amount} bytes", flush=True)
                time.sleep(args.step_interval)
        for uuid in uuids:
            print(f"allocated {size} on {uuid}", flush=True)
        if args.until_signal:
            while True:
                signal.pause()
        elif args.hold:
            time.sleep(args.hold)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for path in files:
            path.unlink(missing_ok=True)
            path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
