"""scheduler/offload.py: the start forecast's forked child. Its answer comes back, its
failures come back as errors (never as a second scheduler running on), and it holds none
of the scheduler's descriptors (an inherited instance lock would outlive a killed daemon)."""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

import pytest

from scheduler.offload import ChildFailed, in_child


def test_the_answer_comes_back_from_another_process() -> None:
    pid, answer = in_child(lambda: (os.getpid(), {i: i / 2 for i in range(50_000)}))  # > a pipe's buffer
    assert pid != os.getpid() and answer[49_999] == 24_999.5


def test_an_error_in_the_child_is_raised_here() -> None:
    with pytest.raises(ChildFailed, match="ZeroDivisionError"):
        in_child(lambda: 1 / 0)


def test_a_child_killed_before_answering_is_an_error() -> None:
    with pytest.raises(ChildFailed, match="no answer"):
        in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_the_child_holds_none_of_the_parents_descriptors(tmp_path: Path) -> None:
    lock = os.open(tmp_path / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        open_in_child = in_child(lambda: sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
    finally:
        os.close(lock)
    assert lock not in open_in_child
    assert len(open_in_child) == 2  # the answer's pipe, and listdir's own (fd 0: stdin is closed too)


def test_a_child_that_does_not_answer_in_time_is_killed_and_an_error() -> None:
    with pytest.raises(ChildFailed, match=r"did not answer within 0\.5s"):
        in_child(lambda: os.kill(os.getpid(), signal.SIGSTOP), timeout_s=0.5)  # stopped: never answers
