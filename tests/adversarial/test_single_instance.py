"""Break 6: a second `gpulab scheduler` (or `gpulab up`) on the same state directory deletes
the live API socket when it starts (scheduler/api_server.py ApiServer.__init__ unlinks
whatever is there) and again when it exits (scheduler/main.py run_scheduler), cutting the
running scheduler off from every user. Desired: the second one says one is already running
and exits non-zero; the first one keeps answering."""

from __future__ import annotations

from tests.adversarial.support import cli_argv
from tests.helpers.stack import Daemon, Stack


def _second_instance_outcome(stack: Stack, daemon: Daemon, ready: str) -> tuple[bool, int]:
    """(whether it came up, its exit code) once it has either exited or come up and been stopped."""
    try:
        daemon.wait_line(ready)
        came_up = True
    except AssertionError:  # it exited without coming up
        came_up = False
    return came_up, daemon.stop()


def test_second_scheduler_on_the_same_state_dir_refuses_and_leaves_the_socket(stack: Stack) -> None:
    """Break 6 (scheduler): the second `gpulab scheduler` takes over the socket path, then
    deletes it on exit; `gpulab queue` then fails for everyone."""
    first = stack.start_scheduler()
    second = Daemon([*cli_argv(stack), "scheduler"], stack.env)
    came_up, code = _second_instance_outcome(stack, second, "scheduler ready")
    queue = stack.cli("queue")
    assert first.proc.poll() is None
    assert queue.returncode == 0, f"the running scheduler was cut off: {queue.stderr.strip()}"
    assert not came_up and code != 0, "a second scheduler started on the same state dir:\n" + "\n".join(second.lines)
    assert any("running" in line for line in second.lines), second.lines


def test_second_up_on_the_same_state_dir_refuses_and_leaves_the_socket(stack: Stack) -> None:
    """Break 6 (up): `gpulab up` finds the stack's Redis reachable and starts a second
    scheduler (and worker) on the same state dir, with the same effect on the socket."""
    stack.start_scheduler()
    stack.start_worker()
    up = Daemon([*cli_argv(stack), "up", "--sim-gpus", "1x24GiB", "--name", "n2"], stack.env)
    came_up, code = _second_instance_outcome(stack, up, "gpulab: up.")
    queue = stack.cli("queue")
    assert queue.returncode == 0, f"the running scheduler was cut off: {queue.stderr.strip()}"
    assert not came_up and code != 0, "a second stack started on the same state dir:\n" + "\n".join(up.lines)
    assert any("running" in line for line in up.lines), up.lines
