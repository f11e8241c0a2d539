"""jobs/daemons.py StopSignals: a SIGTERM stops a daemon's main thread whatever that thread
is doing when it comes. A handler that set the stop Event itself deadlocked the scheduler
when the signal came while its main thread held that Event's lock (inside `stop.wait`): the
handler runs on the main thread and waited for it forever (a suite run's scheduler ignored
SIGTERM for 60 s). Here the main thread waits in as tight a loop as it can, so that a signal
meets it inside the wait as often as possible; each child must stop."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.helpers.stack import ROOT

CHILD = """
import sys, threading
from jobs.daemons import StopSignals
stop = threading.Event()
stops = StopSignals(stop)
print("ready", flush=True)
while not stops.wait(0):
    pass
print("stopped by", stops.received, "set:", stop.is_set(), flush=True)
"""


def test_a_sigterm_at_any_moment_of_the_wait_stops_the_main_thread() -> None:
    for _ in range(12):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise AssertionError("the child did not stop within 30 s of its SIGTERM") from None
        assert child.returncode == 0, out
        assert f"stopped by {int(signal.SIGTERM)} set: True" in out


def test_a_sigterm_wakes_a_long_wait_at_once() -> None:
    """The wakeup fd ends the wait: the stop does not wait out its timeout."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.replace("stops.wait(0)", "stops.wait(3600)")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert f"stopped by {int(signal.SIGTERM)} set: True" in out
