"""worker/process_tree.py reads the process table itself (/proc/<pid>/stat): a job names its
processes, so the parsing must survive any name a process can give itself."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.process_tree import children_by_parent, tree_pids


@pytest.fixture
def hostile_child(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child whose command name (comm, what /proc/<pid>/stat quotes in parentheses) holds
    a ") " and spaces, as if the stat line's fields ended early."""
    sleeper = tmp_path / ") 1 S 1 ("
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
    proc = subprocess.Popen([str(sleeper), "600"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_child_with_a_hostile_name_is_found_under_its_parent(hostile_child: subprocess.Popen[bytes]) -> None:
    table = children_by_parent()
    assert hostile_child.pid in table[os.getpid()]
    assert not any(hostile_child.pid in kids for parent, kids in table.items() if parent != os.getpid())
    assert hostile_child.pid in tree_pids(os.getpid(), table)
    assert tree_pids(os.getpid(), table) == tree_pids(os.getpid())  # the same as psutil's own walk
