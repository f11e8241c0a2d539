"""The worker's heartbeat renews the leases of started jobs only (worker/daemon.py).

Found by `python -m bench drain` on a loaded machine: a launch that waited in the node's RQ
queue past its assignment's lease came back "lost" from a heartbeat that renewed it while the
job was starting; the start transition succeeded just before that answer was acted on, and a
job that had just started was stopped and failed as NodeLost."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs import keys
from jobs.config import Config, WorkerConfig
from jobs.gpus import NodeHeartbeat
from jobs.record import GpuAssignment, JobRecord
from jobs.spec import JobSpec
from jobs.states import JobState
from worker.daemon import WorkerDaemon
from worker.runner import JobRunner
from worker.sim_probe import SimProbe


@pytest.fixture
def daemon(tmp_path: Path, redis_client: redis.Redis) -> Iterator[WorkerDaemon]:
    config = Config(state_dir=tmp_path / "state", worker=WorkerConfig(lease_ttl_s=10, kill_grace_s=1))
    (tmp_path / "sim").mkdir()
    worker = WorkerDaemon(config, redis_client, SimProbe("hb", [2**34], tmp_path / "sim"), "hb", simulated=True)
    worker._claim_name()
    yield worker
    worker.shim_server.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])  # stands for the job's shim: a live process
    yield proc
    proc.kill()
    proc.wait()


def _runner(daemon: WorkerDaemon, job_id: int, proc: subprocess.Popen[bytes], uuid: str = "GPU-hb-0") -> JobRunner:
    spec = JobSpec(command=("/bin/true",), cwd="/", env={})
    record = JobRecord(
        id=job_id, spec=spec, state=JobState.RUNNING, user="me", uid=os.geteuid(), node="hb",
        gpus=(GpuAssignment(0, uuid),), attempt=1,
    )  # fmt: skip
    runner = JobRunner(
        record, daemon.config, "hb", simulated=True, store_transition=lambda t: None,
        record_end=lambda t, late: None, before_finish=lambda r: None, fence=daemon.fence,
    )  # fmt: skip
    runner.proc = proc
    daemon.runners[job_id] = runner
    return runner


def test_a_starting_job_is_not_stopped_for_its_lapsed_assignment(
    daemon: WorkerDaemon, sleeper: subprocess.Popen[bytes]
) -> None:
    runner = _runner(daemon, 41, sleeper)  # its assignment's lease has lapsed: no lease key
    assert not runner.gate_open
    daemon.publish_heartbeat()
    assert runner._stop_reason == ""  # its start transition decides (refused if requeued meanwhile)


def test_a_started_job_whose_lease_is_gone_is_stopped(
    daemon: WorkerDaemon, sleeper: subprocess.Popen[bytes], redis_client: redis.Redis
) -> None:
    runner = _runner(daemon, 42, sleeper)
    runner._gate_open = True  # "go" was sent: it holds the lease its start set
    redis_client.set(keys.lease(43), "hb", px=10_000)
    held = _runner(daemon, 43, sleeper)
    held._gate_open = True
    daemon.publish_heartbeat()
    assert runner._stop_reason == "lease"  # the scheduler may run it elsewhere: never twice
    assert held._stop_reason == ""
    assert 0 < redis_client.pttl(keys.lease(43)) <= 10_000


def _sim_file(daemon: WorkerDaemon, pid: int, nbytes: int) -> None:
    assert isinstance(daemon.probe, SimProbe)
    (daemon.probe.sim_dir / daemon.probe.uuids[0] / str(pid)).write_text(f"{nbytes}\n")


def _published(redis_client: redis.Redis) -> NodeHeartbeat:
    raw = redis_client.get(keys.node("hb"))
    assert raw is not None
    return NodeHeartbeat.from_json(json.loads(raw))


def test_a_job_end_publishes_the_gpus_now_with_the_last_measure(
    daemon: WorkerDaemon, sleeper: subprocess.Popen[bytes], redis_client: redis.Redis
) -> None:
    """After a job end, before its end is recorded (and wakes the scheduler), the node's GPUs
    as they are now, with the freed memory, are published. That beat measures nothing else:
    the running jobs' usage and the outside processes' peaks are the last full beat's (the
    process table is read and enforcement done by the periodic beat only)."""
    gib = 2**30
    uuid = daemon.probe.uuids[0]  # type: ignore[attr-defined]
    ender_proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE)  # exits 0 when its input closes
    stayer_proc = subprocess.Popen(["sleep", "60"])
    try:
        ender = _runner(daemon, 51, ender_proc, uuid)
        _runner(daemon, 52, stayer_proc, uuid)
        _sim_file(daemon, ender_proc.pid, 3 * gib)
        _sim_file(daemon, stayer_proc.pid, 2 * gib)
        _sim_file(daemon, sleeper.pid, 1 * gib)  # not gpulab's: held at its peak
        daemon.publish_heartbeat()
        full = _published(redis_client)
        assert {(u.job_id, u.current_bytes) for u in full.job_usage} == {(51, 3 * gib), (52, 2 * gib)}
        assert full.foreign_peak_bytes == {uuid: gib}

        _sim_file(daemon, stayer_proc.pid, 5 * gib)  # grew since the full beat
        assert ender_proc.stdin is not None
        ender_proc.stdin.close()
        assert ender_proc.wait() == 0
        daemon._before_finish(ender)

        light = _published(redis_client)
        (device,) = light.snapshot.devices
        assert device.used_bytes == 6 * gib  # the ended job's 3 GiB are back
        assert [(u.job_id, u.current_bytes) for u in light.job_usage] == [(52, 2 * gib)]  # the last measure
        assert light.foreign_peak_bytes == {uuid: gib}
        assert 51 not in daemon.runners

        daemon.publish_heartbeat()  # the periodic beat measures again
        assert [(u.job_id, u.current_bytes) for u in _published(redis_client).job_usage] == [(52, 5 * gib)]
    finally:
        for proc in (ender_proc, stayer_proc):
            proc.kill()
            proc.wait()
