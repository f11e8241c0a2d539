"""Daemons' Redis connections: one URL, retries with backoff, one clear line when down."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


class RedisUnavailable(RuntimeError):
    pass


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def make_client(url: str, password: str | None = None) -> redis.Redis:
    """`rediss://` URLs get TLS from redis-py. A password in the URL wins over `password`."""
    # Blocking reads (BLPOP, XREAD) block for at most 2 s, well inside the socket timeout.
    return redis.Redis.from_url(
        url,
        password=password,
        socket_connect_timeout=5,
        socket_timeout=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


def connect_redis(url: str, who: str, password: str | None = None) -> redis.Redis:
    """A client that has answered PING, or RedisUnavailable naming the URL and the cause."""
    client = make_client(url, password)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        hint = "" if password else " (set [redis] password_file or GPULAB_REDIS_PASSWORD)"
        raise RedisUnavailable(f"{who}: Redis at {redact(url)} refused the credentials: {exc}{hint}") from None
    except redis.RedisError as exc:
        raise RedisUnavailable(f"{who}: cannot reach Redis at {redact(url)}: {exc}") from None
    return client
