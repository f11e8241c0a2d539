"""Reading a marker file written by tests/chaos/marked_job.py, and driving its jobs."""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers.stack import eventually


@dataclass(frozen=True)
class Start:
    job: int
    attempt: int
    pid: int
    ancestors: tuple[int, ...]  # parent, grandparent, ...: the worker that started it is in there
    node: str
    live: tuple[int, ...]  # earlier copies of the job still alive when this one started

    @property
    def ppid(self) -> int:
        return self.ancestors[0] if self.ancestors else 0

    def started_by(self, worker_pid: int) -> bool:
        """Whether that worker started this copy (its shim sits between them)."""
        return worker_pid in self.ancestors


@dataclass(frozen=True)
class End:
    job: int
    attempt: int
    pid: int
    code: int


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (orphans may stay zombies when PID 1 does not reap)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def try_release(fifo: Path, code: int = 0) -> bool:
    """Write an exit code into the FIFO if a job is blocked reading it; False if none is."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return False
        raise
    try:
        os.write(fd, str(code).encode())
    finally:
        os.close(fd)
    return True


class Marker:
    def __init__(self, folder: Path) -> None:
        self.path = folder / "marker.log"
        self.fifo_dir = folder / "fifos"
        self.fifo_dir.mkdir()

    def job_args(self, *extra: str) -> list[str]:
        """`gpulab submit` arguments after the options: `-- python -m tests.chaos.marked_job ...`."""
        return ["--", sys.executable, "-m", "tests.chaos.marked_job", str(self.path), str(self.fifo_dir), *extra]

    def lines(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.path.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def starts(self, job: int | None = None) -> list[Start]:
        out = []
        for p in self.lines():
            if p[0] == "start" and (job is None or int(p[1]) == job):
                live = p[6].removeprefix("live=")
                pids = () if live == "-" else tuple(int(x) for x in live.split(","))
                chain = p[7].removeprefix("ancestors=") if len(p) > 7 else p[4]
                above = tuple(int(x) for x in chain.split(",") if x)
                out.append(Start(int(p[1]), int(p[2]), int(p[3]), above, p[5], pids))
        return out

    def ends(self, job: int | None = None) -> list[End]:
        return [
            End(int(p[1]), int(p[2]), int(p[3]), int(p[4]))
            for p in self.lines()
            if p[0] == "end" and (job is None or int(p[1]) == job)
        ]

    def escaped(self, job: int) -> list[int]:
        return [int(p[3]) for p in self.lines() if p[0] == "escaped" and int(p[1]) == job]

    def start(self, job: int, attempt: int) -> Start | None:
        return next((s for s in self.starts(job) if s.attempt == attempt), None)

    def wait_start(self, job: int, attempt: int) -> Start:
        """The job's process writes its start line itself: await it in the file."""
        return eventually(lambda: self.start(job, attempt))

    def fifo(self, job: int, attempt: int) -> Path:
        return self.fifo_dir / f"{job}.{attempt}"

    def release(self, job: int, attempt: int, code: int = 0) -> bool:
        """Let that attempt end with `code`. False if its process is gone (nothing to release)."""
        start = self.wait_start(job, attempt)

        def step() -> str | None:
            if try_release(self.fifo(job, attempt), code):
                return "released"
            return None if pid_alive(start.pid) else "gone"

        return bool(eventually(step) == "released")

    def pids(self) -> set[int]:
        return {s.pid for s in self.starts()} | {int(p[3]) for p in self.lines() if p[0] == "escaped"}

    def kill_leftovers(self) -> None:
        """Teardown: SIGKILL every process of these jobs still alive (only our helper's)."""
        for pid in self.pids():
            try:
                proc = psutil.Process(pid)
                if "tests.chaos.marked_job" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    def assert_exactly_once(self, jobs: list[int]) -> None:
        """Each job: never two copies alive at once, and exactly one `end` (one outcome)."""
        problems = []
        for job in jobs:
            overlapping = [s for s in self.starts(job) if s.live]
            if overlapping:
                problems.append(f"job {job}: attempt(s) started while earlier copies were alive: {overlapping}")
            ends = self.ends(job)
            if len(ends) != 1:
                problems.append(f"job {job}: {len(ends)} end lines, expected 1: {ends}")
        assert not problems, "\n".join(problems) + "\nmarker file:\n" + self.path.read_text()
