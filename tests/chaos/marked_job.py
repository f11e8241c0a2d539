"""A chaos-test job that records its life in a marker file, then blocks on its own FIFO.

    python -m tests.chaos.marked_job MARKER FIFO_DIR [--escape]

It appends (O_APPEND, one write per line, so lines from concurrent copies never interleave):

    start <job> <attempt> <pid> <ppid> <node> live=<pids> ancestors=<pids>
    end <job> <attempt> <pid> <code>

`ancestors=` is the parent's pid, then the grandparent's... (comma separated, up to PID 1):
whatever sits between the worker and the job (its shim), the worker's pid is in there.
`live=` lists the pids of earlier starts of the same job that are still alive at this start
(an overlap: two copies of one job at once); `-` when none. It then blocks on the FIFO
FIFO_DIR/<job>.<attempt> (created by itself, before the start line) until the test writes
an exit code into it, writes the end line and exits with that code. No sleeps: the test
decides when it ends. A copy killed before that never writes its end line.

With --escape it first double-forks a grandchild that calls setsid (leaving the job's
process group and its process tree) and blocks forever; the start line is preceded by
`escaped <job> <attempt> <pid>`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path


def append(marker: Path, line: str) -> None:
    fd = os.open(marker, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """A live process running this helper (a zombie or a reused pid does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X") and b"tests.chaos.marked_job" in cmdline


def live_earlier_copies(marker: Path, job: str) -> list[int]:
    try:
        lines = marker.read_text().splitlines()
    except FileNotFoundError:
        return []
    pids = [int(p[3]) for p in (line.split() for line in lines) if p[:2] == ["start", job]]
    return [pid for pid in pids if pid != os.getpid() and alive(pid)]


def ancestors() -> list[int]:
    """Parent, grandparent, ... up to PID 1: which worker started this copy, whatever sits
    between (the job's shim is its parent, the worker the shim's)."""
    chain: list[int] = []
    pid = os.getppid()
    while pid > 1 and len(chain) < 16:
        chain.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def escape() -> int:
    """Double fork + setsid: a grandchild outside the job's group and tree. Returns its pid."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os.setsid()
        if os.fork() == 0:
            os.write(write_end, str(os.getpid()).encode())
            os.close(write_end)
            while True:
                signal.pause()
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as f:
        return int(f.read())


def main() -> int:
    marker, fifo_dir = Path(sys.argv[1]), Path(sys.argv[2])
    job, attempt = os.environ["GPULAB_JOB_ID"], os.environ["GPULAB_ATTEMPT"]
    node = os.environ.get("GPULAB_NODE", "?")
    fifo = fifo_dir / f"{job}.{attempt}"
    if "--escape" in sys.argv[3:]:
        append(marker, f"escaped {job} {attempt} {escape()}")
    live = live_earlier_copies(marker, job)
    with contextlib.suppress(FileExistsError):
        os.mkfifo(fifo)
    live_text = ",".join(map(str, live)) or "-"
    chain = ",".join(map(str, ancestors()))
    append(marker, f"start {job} {attempt} {os.getpid()} {os.getppid()} {node} live={live_text} ancestors={chain}")
    with open(fifo) as f:  # blocks until the test opens the FIFO for writing
        code = f.read().strip() or "0"
    append(marker, f"end {job} {attempt} {os.getpid()} {code}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
