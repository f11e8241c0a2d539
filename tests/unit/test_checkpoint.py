"""Checkpoint files: atomic writes, rotation, and falling back past a corrupt newest file.

A requeued job's progress is only as good as its newest *loadable* checkpoint: these tests
pin down that a truncated file never wins and never pushes a good one out of the rotation.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from worker.training.checkpoint import (  # noqa: E402
    CKPT_FORMAT,
    CheckpointManager,
    capture_rng_state,
    checkpoint_name,
    restore_rng_state,
)


def _state(step: int) -> dict[str, object]:
    """A minimal checkpoint dict with the keys the loader requires."""
    return {
        "format": CKPT_FORMAT,
        "step": step,
        "epoch": 1,
        "batch_in_epoch": step,
        "model": {"w": torch.full((4,), float(step))},
        "optimizer": {},
        "rng": capture_rng_state(),
    }


def _ckpt_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_name_is_zero_padded_so_sorting_is_by_step() -> None:
    assert checkpoint_name(42) == "ckpt-000000042.pt"
    assert sorted([checkpoint_name(100), checkpoint_name(9)]) == [checkpoint_name(9), checkpoint_name(100)]


def test_save_writes_final_name_only_and_keeps_newest_k(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "ck"), keep=2)
    for step in (5, 10, 15):
        mgr.save(_state(step), step)
    # no temp files left behind, the oldest pruned
    assert _ckpt_files(tmp_path / "ck") == [checkpoint_name(10), checkpoint_name(15)]
    loaded = mgr.load_latest()
    assert loaded is not None and loaded.step == 15
    assert torch.equal(loaded.state["model"]["w"], torch.full((4,), 15.0))


def test_truncated_newest_is_skipped_and_previous_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mgr = CheckpointManager(str(tmp_path), keep=3)
    mgr.save(_state(10), 10)
    newest = mgr.save(_state(20), 20)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as fh:
        fh.truncate(size // 2)
    loaded = mgr.load_latest()
    assert loaded is not None and loaded.step == 10
    assert "skipping unreadable checkpoint" in capsys.readouterr().err
    # set aside so it cannot shadow later checkpoints or win the rotation
    assert _ckpt_files(tmp_path) == [checkpoint_name(10), checkpoint_name(20) + ".corrupt"]
    mgr.save(_state(15), 15)
    assert [s for s, _ in mgr.list_steps()] == [15, 10]


def test_garbage_and_wrong_step_are_rejected(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path), keep=3)
    mgr.save(_state(1), 1)
    (tmp_path / checkpoint_name(2)).write_bytes(b"not a zip file at all")
    torch.save(_state(99), tmp_path / checkpoint_name(3))  # name and content disagree
    loaded = mgr.load_latest()
    assert loaded is not None and loaded.step == 1


def test_no_checkpoint_means_fresh_start(tmp_path: Path) -> None:
    assert CheckpointManager(str(tmp_path / "missing")).load_latest() is None
    mgr = CheckpointManager(str(tmp_path))
    (tmp_path / checkpoint_name(7)).write_bytes(b"")
    assert mgr.load_latest() is None


def test_clean_temp_files_removes_only_leftovers(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(_state(3), 3)
    leftover = tmp_path / f".{checkpoint_name(4)}.tmp-12345"
    leftover.write_bytes(b"half")
    mgr.clean_temp_files()
    assert _ckpt_files(tmp_path) == [checkpoint_name(3)]


def test_rng_state_round_trips_through_a_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(_state(1), 1)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loaded = mgr.load_latest()
    assert loaded is not None
    restore_rng_state(loaded.state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CheckpointManager(str(tmp_path), keep=0)
