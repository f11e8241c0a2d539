"""The API when Redis does not answer (SIGSTOP: a stalled primary, a network partition).

Break (found by the final attack pass of this round): `gpulab cancel` while Redis was frozen
for 20 s answered "internal error in the scheduler (see its log)" and logged a traceback:
only a refused connection was taken for Redis being away, not a call that timed out."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from cli.client import ApiClient
from jobs import api
from jobs.config import Config
from jobs.redis_conn import make_client
from scheduler.api_server import ApiServer
from scheduler.redis_server import RedisServer
from scheduler.service import SchedulerService
from tests.helpers.stack import free_port


def test_a_call_that_redis_does_not_answer_is_503_and_names_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port())
    server.start()
    assert server.proc is not None
    client = make_client(server.url, timeout_s=0.3)  # the scheduler's own client, with a short timeout
    service = SchedulerService(Config(state_dir=tmp_path / "state"), client)
    api_server = ApiServer(tmp_path / "api.sock", service)
    threading.Thread(target=api_server.serve_forever, daemon=True).start()
    try:
        server.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(api.ApiError) as refused:
            ApiClient(tmp_path / "api.sock").job(1)
        assert refused.value.status == 503
        assert "Redis" in refused.value.message and "internal error" not in refused.value.message
    finally:
        server.proc.send_signal(signal.SIGCONT)
        api_server.shutdown()
        api_server.server_close()
        server.stop()
