"""Daemons' Redis connections: one URL, retries with backoff, one clear line when down."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


class RedisUnavailable(RuntimeError):
    pass


def make_client(url: str) -> redis.Redis:
    # Blocking reads (BLPOP, XREAD) block for at most 2 s, well inside the socket timeout.
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


def connect_redis(url: str, who: str) -> redis.Redis:
    """A client that has answered PING, or RedisUnavailable naming the URL and the cause."""
    client = make_client(url)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(f"{who}: Redis at {url} refused the credentials: {exc}") from None
    except redis.RedisError as exc:
        raise RedisUnavailable(f"{who}: cannot reach Redis at {url}: {exc}") from None
    return client
