"""A job's process tree: who belongs to it (for GPU attribution) and how to stop all of it.

The root of a job's tree is its shim (worker/shim.py), a child subreaper: everything the job
starts, setsid'd and double-forked escapees included, stays below it while it lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import psutil

log = logging.getLogger("gpulab.worker")

KILL_ROUNDS = 50  # a tree that keeps forking is killed again, this many times at most
ORPHAN_LOOKS = 5  # looks at the children per orphan sweep (see sweep_orphans)

# Held by whoever starts a child of this process (the worker), from before the fork until the
# child has exec'd and its pid is where the orphan sweep looks; the sweep holds it while it
# looks. Between fork and exec a child still looks like the worker (same command line), and
# a sweep that looked then took the worker's own shim fork server, just being started, for a
# job's orphan and killed it: a job failed "the shim server exited" (once in a suite run).
CHILD_STARTS = threading.Lock()


def children_by_parent() -> dict[int, list[int]]:
    """The whole process table as parent pid -> child pids, read once (psutil's children()
    reads it all for each call: a heartbeat over hundreds of jobs did it hundreds of times).

    Straight from /proc/<pid>/stat: psutil builds a Process object per pid (reading its start
    time too): 4.8 ms for 88 processes against 1.0 ms here. A worker reads it after job ends,
    and in a drain of short jobs psutil's way took a third of the worker's CPU (py-spy)."""
    table: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
        except OSError:  # exited meanwhile
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so from the last ")"
        after = data[data.rfind(b")") + 2 :].split(b" ", 2)
        if len(after) >= 2 and after[1].isdigit():
            table.setdefault(int(after[1]), []).append(int(name))
    return table


def tree_pids(root_pid: int, children: dict[int, list[int]] | None = None) -> set[int]:
    """The root and all its live descendants (DataLoader workers, launched helpers...);
    `children` (children_by_parent()) saves reading the process table again."""
    if children is None:
        try:
            root = psutil.Process(root_pid)
            return {root_pid} | {c.pid for c in root.children(recursive=True)}
        except psutil.Error:
            return set()
    if not psutil.pid_exists(root_pid):
        return set()
    found = {root_pid}
    frontier = [root_pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, ()) if c not in found]
        found.update(frontier)
    return found


def signal_tree(root_pid: int, sig: int) -> None:
    """Signal the root's process group, and every descendant that left the group (setsid)."""
    descendants = tree_pids(root_pid) - {root_pid}
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root_pid, sig)  # the root was started as the leader of its own group
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """Running, not a zombie (a zombie is dead: it waits only for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split(b" ", 2)[1]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _await_dead(pids: set[int], timeout: float = 0.2) -> None:
    """Until every one of `pids` is dead or a zombie (SIGKILLed: at once), `timeout` at most."""
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.005)


def kill_tree(root_pid: int) -> None:
    """SIGKILL a whole tree: the descendants first, while the root (a subreaper) still holds
    them, then the root. Repeated while the tree still has live members (it may be forking).

    Zombies count as dead: one whose parent never reaps it stays until that parent dies, and
    waiting for it to go made each such tree cost 50 rounds of 0.2 s (a job's escapee keeping
    an unreaped child held the orphan sweep 10 s, its lease lapsing meanwhile)."""
    for _ in range(KILL_ROUNDS):
        descendants = {pid for pid in tree_pids(root_pid) - {root_pid} if _alive(pid)}
        if not descendants:
            break
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _await_dead(descendants)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root_pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(root_pid, signal.SIGKILL)


def find_shims(shim_path: str, node: str, state_dir: str) -> list[tuple[int, int, int]]:
    """Shims of `node` of the gpulab whose state is in `state_dir` (one host may run workers
    of several), on this host: (pid, parent pid, the worker pid it was started for)."""
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        argv = proc.info.get("cmdline") or []
        if shim_path not in argv[:4] or "-I" not in argv[:4]:
            continue
        options = dict(zip(argv[4::2], argv[5::2], strict=False))
        worker = options.get("--worker-pid", "")
        if options.get("--node") == node and options.get("--state-dir") == state_dir and worker.isdigit():
            found.append((proc.info["pid"], proc.info["ppid"] or 0, int(worker)))
    return found


def sweep_orphans(known: Callable[[], set[int]], *, wait: bool = True) -> bool:
    """Kill (with everything it started) and reap each child of this process that is not in
    `known()`: in a subreaper, such a child is a job process whose shim died and that was
    adopted. A child being started (CHILD_STARTS) is waited for, or, without `wait`, the sweep
    is skipped (False) and left to the next one. Nothing is spared for its command line: a job
    can put anything there (one that named the shim's path was spared, with its tree)."""
    if not CHILD_STARTS.acquire(blocking=wait):
        return False
    try:
        keep = known()
        me = os.getpid()
        # Again while a look found anything: the process table is read one process at a time,
        # so a job process that exited during the read can show as a zombie whose child (an
        # escapee it forked) was listed under it, not yet under this process (found by
        # test_round2's shim-killing job, once in a suite run). A forking tree's new members,
        # their parents killed, are this process's children at the next look.
        for _ in range(ORPHAN_LOOKS):
            # One read of the process table per look, every orphan's tree killed at once: a
            # kill_tree per orphan read the whole table per orphan, and an array of jobs that
            # killed their shims leaving escapees held the heartbeat's sweep for seconds (every
            # lease of the node lapsed).
            table = children_by_parent()
            orphans = [pid for pid in table.get(me, ()) if pid not in keep]
            if not orphans:
                break
            members = {pid for orphan in orphans for pid in tree_pids(orphan, table) if _alive(pid)}
            for pid in orphans:
                if pid in members:
                    log.warning("worker: killing pid %s, left behind by a job whose shim died", pid)
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            _await_dead(members)
            for pid in orphans:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
    finally:
        CHILD_STARTS.release()
    return True
