"""Stall a real redis-server for a while: a Lua script that spins (below Redis's
busy-reply-threshold, 5 s, so other clients are not answered BUSY: they just wait), as a
slow fsync, a fork or a paused VM would. Clients whose calls time out meanwhile resend them,
and Redis runs the first send too once it is free: the fault behind lost answers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import redis

BUSY_SCRIPT = """
local t = redis.call('TIME')
local until_us = (tonumber(t[1]) * 1000000 + tonumber(t[2])) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= until_us
return 1
"""


@contextlib.contextmanager
def stalled(url: str, ms: int) -> Iterator[None]:
    """Inside: Redis at `url` is busy (seen not answering a PING) for about `ms` from entry.
    On leaving, waits until it is free again."""
    busy_client = redis.Redis.from_url(url)
    probe = redis.Redis.from_url(url, socket_timeout=0.05)
    busy = threading.Thread(target=lambda: busy_client.eval(BUSY_SCRIPT, 0, ms))
    busy.start()
    try:
        while True:  # until Redis is seen busy: a PING it does not answer
            try:
                probe.ping()
            except redis.TimeoutError:
                break
        yield
    finally:
        busy.join()
        busy_client.close()
        probe.close()
