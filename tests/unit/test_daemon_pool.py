"""scheduler/notify/pool.py DaemonPool: ThreadPoolExecutor's submit and shutdown on daemon
threads, so a process never waits at exit for work under way."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from scheduler.notify.pool import DaemonPool
from tests.helpers.stack import ROOT


def test_results_and_errors_come_back_through_the_futures() -> None:
    pool = DaemonPool(2, "t")
    assert pool.submit(pow, 2, 10).result(timeout=30) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=30)
    pool.shutdown()


def test_at_most_max_workers_threads_and_each_a_daemon() -> None:
    pool = DaemonPool(2, "t")
    gate = threading.Event()
    futures = [pool.submit(gate.wait, 30) for _ in range(5)]
    names = {t.name: t.daemon for t in threading.enumerate() if t.name.startswith("t_")}
    assert names == {"t_0": True, "t_1": True}
    gate.set()
    assert all(f.result(timeout=30) for f in futures)
    pool.shutdown()


def test_shutdown_cancels_work_not_started_and_refuses_more() -> None:
    pool = DaemonPool(1, "t")
    gate = threading.Event()
    running = pool.submit(gate.wait, 30)
    queued = pool.submit(pow, 2, 2)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 2)
    gate.set()
    assert running.result(timeout=30) is True


def test_the_process_exits_with_work_still_under_way() -> None:
    code = (
        "import threading\n"
        "from scheduler.notify.pool import DaemonPool\n"
        "pool = DaemonPool(1, 't')\n"
        "started = threading.Event()\n"
        "pool.submit(lambda: (started.set(), threading.Event().wait()))\n"
        "started.wait()\n"
        "print('exiting', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr
