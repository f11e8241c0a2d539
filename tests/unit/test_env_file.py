"""`--env-file` is read by the CLI as the user: a FIFO or a device where a file is expected
must give one clear error, not hang the CLI or read without end (found by the round-3 attack)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.env_capture import MAX_ENV_FILE_BYTES, read_env_file
from jobs.spec import SpecError


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "env"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="not a regular file"):
        read_env_file(fifo)  # with no writer, a blocking open would never return


def test_a_device_is_refused() -> None:
    with pytest.raises(SpecError, match="not a regular file"):
        read_env_file(Path("/dev/zero"))


def test_a_huge_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "env"
    big.write_text("A=" + "x" * MAX_ENV_FILE_BYTES + "\n")
    with pytest.raises(SpecError, match="larger than"):
        read_env_file(big)


def test_a_regular_file_still_reads(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.write_text("export A='1'\n# note\nB=two\n")
    assert read_env_file(env) == {"A": "1", "B": "two"}
