"""A job's process tree: who belongs to it (for GPU attribution) and how to stop all of it."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil


def tree_pids(root_pid: int) -> set[int]:
    """The root and all its live descendants (DataLoader workers, launched helpers...)."""
    try:
        root = psutil.Process(root_pid)
        return {root_pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.Error:
        return set()


def signal_tree(root_pid: int, sig: int) -> None:
    """Signal the job's process group, and every descendant that left the group (setsid)."""
    descendants = tree_pids(root_pid) - {root_pid}
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root_pid, sig)  # the job was started as the leader of its own group
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_group(root_pid: int) -> None:
    """After the leader exited, anything left in its group (orphaned children) is killed too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root_pid, signal.SIGKILL)
