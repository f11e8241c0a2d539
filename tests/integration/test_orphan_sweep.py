"""The worker's orphan sweep (worker/process_tree.py, sweep_orphans) against children being
started: between fork and exec a child looks like the worker itself, and a sweep that looked
then killed the worker's shim fork server as it started (a job failed "the shim server
exited", once in a suite run). Each scenario runs in a child Python process of its own, which
plays the worker: the sweep kills its caller's unknown children, and the test process has its
Redis servers among its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Forks a child standing in for one between fork and exec (it blocks on a pipe, looking
# exactly like its parent), under CHILD_STARTS, and sweeps from another thread meanwhile.
# Another child, forked outside CHILD_STARTS and never registered, stands for an orphan.
SCENARIO = textwrap.dedent(
    """
    import json, os, sys, threading
    from worker.process_tree import CHILD_STARTS, sweep_orphans

    def blocked_child() -> tuple[int, int]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.read(r, 1)
            os._exit(0)
        return pid, w

    known: set[int] = set()
    seen_at_sweep: list[set[int]] = []

    def sweep_known() -> set[int]:
        seen_at_sweep.append(set(known))
        return set(known)

    orphan, _ = blocked_child()
    with CHILD_STARTS:
        starting, release_w = blocked_child()
        skipped = not sweep_orphans(sweep_known, wait=False)  # the heartbeat's
        sweeper = threading.Thread(target=sweep_orphans, args=(sweep_known,))
        sweeper.start()
        sweeper.join(timeout=1.0)  # it must wait for the start to be registered, however long
        waited = sweeper.is_alive()
        known.add(starting)
    sweeper.join()
    try:  # blocks (the test times out) if the sweep left it running
        orphan_killed = os.WIFSIGNALED(os.waitpid(orphan, 0)[1])
    except ChildProcessError:
        orphan_killed = True  # killed and reaped by the sweep: only the sweep reaps here
    print(json.dumps({
        "skipped": skipped,
        "waited": waited,
        "starting_known_at_sweep": starting in seen_at_sweep[0],
        "starting_alive": os.waitpid(starting, os.WNOHANG) == (0, 0),
        "orphan_killed": orphan_killed,
    }))
    os.write(release_w, b"x")
    os.waitpid(starting, 0)
    """
)


def test_the_sweep_waits_for_a_child_being_started_and_kills_only_orphans() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "skipped": True,
        "waited": True,
        "starting_known_at_sweep": True,
        "starting_alive": True,
        "orphan_killed": True,
    }
