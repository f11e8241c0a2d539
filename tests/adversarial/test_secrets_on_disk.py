"""Break 3: secrets on disk. The embedded Redis of `gpulab up` persists every job record,
captured environments (tokens) included, in its AOF; its data directory and files must be
private to the daemon's user (dir 0700, files 0600)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from tests.adversarial.support import cli_argv
from tests.helpers.stack import ROOT, Daemon, Stack


def test_embedded_redis_data_dir_and_aof_are_private(stack: Stack, tmp_path: Path) -> None:
    """Break 3: scheduler/redis_server.py RedisServer.start makes the data dir with the
    default mode (0755 under umask 022) and redis-server writes the AOF 0644, so on a shared
    server any user can read every captured environment."""
    state = tmp_path / "up-state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    env.update(GPULAB_STATE_DIR=str(state), PYTHONPATH=str(ROOT))
    up = Daemon([*cli_argv(stack), "up", "--sim-gpus", "1x24GiB", "--name", "solo"], env)
    try:
        up.wait_line("gpulab: up.")
        data_dir = state / "redis"
        too_open = {}
        for path in [data_dir, *data_dir.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if (path.is_dir() and mode & 0o077) or (not path.is_dir() and mode & 0o177):
                too_open[str(path.relative_to(state))] = oct(mode)
        assert any(p.name.endswith(".aof") for p in data_dir.rglob("*")), "no AOF written"
        assert not too_open, f"embedded Redis files readable by others (want dirs 0700, files 0600): {too_open}"
    finally:
        assert up.stop(signal.SIGTERM) == 0
