"""`gpulab up`: embedded Redis + scheduler + worker as one foreground process tree."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
import redis

from jobs.states import JobState
from jobs.store import JobStore
from tests.helpers.stack import ROOT, Daemon


def test_up_starts_private_redis_runs_a_job_and_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    env.update(GPULAB_STATE_DIR=str(state), PYTHONPATH=str(ROOT))
    up = Daemon([sys.executable, "-m", "cli", "up", "--sim-gpus", "1x24GiB", "--name", "solo"], env)
    try:
        up.wait_line("gpulab: up.")
        assert any("started redis-server" in line for line in up.lines)
        secret = state / "redis.password"  # generated, owner-only, never on a command line
        assert secret.stat().st_mode & 0o777 == 0o600
        assert (state / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
        password = secret.read_text().strip()
        anonymous = redis.Redis(unix_socket_path=str(state / "redis.sock"))
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        client = redis.Redis(unix_socket_path=str(state / "redis.sock"), password=password)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        children = psutil.Process(up.proc.pid).children(recursive=True)
        assert not any(password in " ".join(c.cmdline()) for c in children)
        cli = [sys.executable, "-m", "cli"]
        submitted = psutil.subprocess.run(
            [*cli, "submit", "--mem", "1GiB", "--", "echo", "hello from gpulab"],
            env=env, capture_output=True, text=True, check=True, cwd=tmp_path,
        )  # fmt: skip
        job_id = int(submitted.stdout)
        record = JobStore(client).wait_final(job_id, 60)
        assert record is not None and record.state == JobState.COMPLETED and record.node == "solo"
        logs = psutil.subprocess.run([*cli, "logs", str(job_id)], env=env, capture_output=True, text=True)
        assert logs.stdout == "hello from gpulab\n"
        client.close()
    finally:
        assert up.stop(signal.SIGTERM) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not (state / "gpulab.sock").exists()
    assert (state / "redis" / "appendonlydir").is_dir()
