"""Run a pure computation in a forked child process and take its pickled result back.

The start forecast (scheduler/forecast.py) is pure CPU work over values the pass handed it.
On a thread of the scheduler's process it held the GIL against the scheduling pass: at 10k
waiting jobs, passes with the forecast on placed 336 jobs/s against 862/s with it off
(`python -m bench placement --sizes 10000 --only-run-pass [--eta-interval 0]`, BENCHMARKS.md
section 11). A forked child computes on the copy-on-write image of the process, holding no
lock of ours, so the pass runs at full speed while it works.

The child does nothing but call `compute`, write the pickled answer to a pipe and `_exit`:
it closes every other descriptor first (the API socket, Redis connections, the instance
lock: a lock must not outlive a scheduler killed with -9 in a child), takes the default
action for SIGTERM/SIGINT (never the daemon's handlers), and never returns into the
caller's stack. The caller blocks reading the pipe (without the GIL), so it runs on a
thread of its own.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ChildFailed(RuntimeError):
    pass


def in_child(compute: Callable[[], T], timeout_s: float = 600.0) -> T:
    """compute() in a forked child process; raises ChildFailed with the child's error, or
    when it has not answered within `timeout_s` (it is killed: a stuck or stopped child must
    not keep the caller waiting for good)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never leaves this block
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.closerange(0, write_fd)  # the read end too, and whatever lies between them
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            gc.disable()  # short-lived: collecting would only copy pages of the parent's image
            try:
                answer = pickle.dumps((True, compute()), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as exc:  # reported to the parent, which decides
                answer = pickle.dumps((False, f"{type(exc).__name__}: {exc}"))
            view = memoryview(answer)
            while view:
                view = view[os.write(write_fd, view) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        raise ChildFailed(f"the child process did not answer within {timeout_s:g}s; killed")
    if not chunks:
        raise ChildFailed(f"the child process ended with no answer (wait status {status})")
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise ChildFailed(str(value))
    return value  # type: ignore[no-any-return]
