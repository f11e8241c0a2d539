"""worker/jobfiles.py: a job's status file is data the worker reads without following,
blocking on or trusting it; a job's directories and log are made without following what a
job may have put in their place."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from worker import jobfiles
from worker.jobfiles import MAX_STATUS_FILE_BYTES, clean_status, read_status_file

ME = os.geteuid()


def _status(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_a_plain_status_file_is_read_once_per_change(tmp_path: Path) -> None:
    path = _status(tmp_path / "status.json", {"kind": "training", "epoch": 2, "loss": 0.5, "metrics": {"acc": 0.9}})
    found = read_status_file(path, ME)
    assert found is not None
    mtime, status = found
    assert status == {"kind": "training", "epoch": 2, "loss": 0.5, "metrics": {"acc": 0.9}}
    assert read_status_file(path, ME, mtime) is None  # unchanged since


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    secret = _status(tmp_path / "secret.json", {"secret": "s3cr3t"})
    link = tmp_path / "status.json"
    link.symlink_to(secret)
    assert read_status_file(link, ME) is None


def test_a_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "status.json"
    os.mkfifo(fifo)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(read_status_file(fifo, ME)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "reading a FIFO status file blocked"
    assert result == [None]


def test_a_huge_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    with open(path, "wb") as f:
        f.truncate(2**30)  # 1 GiB, sparse
    assert read_status_file(path, ME) is None
    path.write_text(json.dumps({"pad": "x" * MAX_STATUS_FILE_BYTES}))
    assert read_status_file(path, ME) is None


def test_a_file_of_another_owner_is_not_read(tmp_path: Path) -> None:
    path = _status(tmp_path / "status.json", {"epoch": 1})
    assert read_status_file(path, ME + 1) is None


def test_a_directory_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "status.json").mkdir()
    assert read_status_file(tmp_path / "status.json", ME) is None


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1, 2]", '"text"', "[" * 100_000, "1" * 5000],
)
def test_what_is_not_a_json_object_is_nothing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "status.json"
    path.write_text(text[:MAX_STATUS_FILE_BYTES])
    found = read_status_file(path, ME)
    assert found is None or found[1] is None


def test_nan_and_infinity_read_as_null(tmp_path: Path) -> None:
    path = _status(tmp_path / "status.json", {})
    path.write_text('{"loss": NaN, "eta_s": Infinity, "x": -Infinity, "y": 1e999, "epoch": 1}')
    found = read_status_file(path, ME)
    assert found is not None and found[1] == {"loss": None, "eta_s": None, "x": None, "y": None, "epoch": 1}
    assert json.loads(json.dumps(found[1], allow_nan=False)) == found[1]


def test_wrong_types_and_sizes_are_dropped_or_capped() -> None:
    status = clean_status(
        {
            "kind": "training",
            "loss": "x",  # a string stays a (capped) string; readers take numbers with jobs.text.number
            "epoch": [1],
            "step": {"a": [1], "b": 2, "c": {"deep": 1}},
            "eta_s": 1e400,  # parsed as inf by json: no number
            "big": 10**30,
            "text": "y" * 1000,
            "": 1,
            "k" * 100: 1,
            "ok": True,
        }
    )
    assert status == {"kind": "training", "loss": "x", "step": {"b": 2}, "eta_s": None, "text": "y" * 200, "ok": True}


def test_a_status_is_capped_in_keys_and_size() -> None:
    many = clean_status({f"k{i}": i for i in range(1000)})
    assert many is not None and len(many) == 30
    wide = clean_status({f"k{i}": {f"m{j}": "z" * 200 for j in range(30)} for i in range(30)})
    assert wide is not None and len(json.dumps(wide)) <= jobfiles.MAX_STATUS_JSON


def test_job_dir_replaces_a_symlink_and_never_chowns_its_target(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    (state / "run" / "5").symlink_to(target)
    jobfiles.job_dir(state, "run", "5", None, None)
    made = state / "run" / "5"
    assert made.is_dir() and not made.is_symlink()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # the symlink's target was not touched


def test_removing_the_old_status_never_follows_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    jobfiles.job_dir(state, "run", "5", None, None)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (state / "run" / "5" / "status.json").symlink_to(victim)
    jobfiles.remove_in_job_dir(state, "run", "5", "status.json")
    assert not (state / "run" / "5" / "status.json").is_symlink()
    assert victim.read_text() == "keep me"


def test_the_log_is_a_regular_file_of_ours(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (state / "logs" / "5.log").symlink_to(victim)
    fd = jobfiles.open_log(state, "5.log", None, None)
    try:
        os.write(fd, b"job output\n")
    finally:
        os.close(fd)
    assert victim.read_text() == "keep me"
    log = state / "logs" / "5.log"
    assert not log.is_symlink() and log.read_text() == "job output\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_fifo_in_the_simulated_gpu_folder_does_not_block_the_probe(tmp_path: Path) -> None:
    """Jobs write their simulated allocations into the sim dir: one that leaves a FIFO under
    its own pid (or as FAIL) must not hang the worker's heartbeat."""
    from worker.sim_probe import FAIL_FILE, SimProbe, sim_uuid

    probe = SimProbe("n1", [2**30], tmp_path)
    folder = tmp_path / sim_uuid("n1", 0)
    os.mkfifo(folder / str(os.getpid()))
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(probe.snapshot()), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "a FIFO blocked the simulated GPU probe"
    os.unlink(folder / str(os.getpid()))
    os.mkfifo(folder / FAIL_FILE)
    reader = threading.Thread(target=lambda: result.append(probe.snapshot()), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "a FIFO FAIL file blocked the simulated GPU probe"
