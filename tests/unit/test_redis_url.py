"""`redis+sentinel://` URLs (jobs/redis_conn.py): parsed, or refused with one line."""

from __future__ import annotations

import pytest

from jobs.redis_conn import BadRedisUrl, RedisUnavailable, connect_redis, parse_sentinel_url


def test_sentinel_url_with_password_hosts_service_and_db() -> None:
    target = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26379,head:26380,[::1]:26381/gpulab/2")
    assert target.sentinels == [("10.0.0.1", 26379), ("head", 26380), ("::1", 26381)]
    assert (target.service, target.db, target.username, target.password) == ("gpulab", 2, None, "s@cret")


def test_sentinel_url_defaults_to_db_0_without_password() -> None:
    target = parse_sentinel_url("redis+sentinel://h:1/mymaster")
    assert (target.sentinels, target.service, target.db, target.password) == ([("h", 1)], "mymaster", 0, None)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h/gpulab",  # no port
        "redis+sentinel://h:99999/gpulab",
        "redis+sentinel://h:1,/gpulab",
        "redis+sentinel://h:1",  # no service
        "redis+sentinel://h:1/gpulab/zero",
        "redis+sentinel://h:1/a/1/extra",
    ],
)
def test_bad_sentinel_urls_are_refused_with_one_line(url: str) -> None:
    with pytest.raises(BadRedisUrl):
        parse_sentinel_url(url)
    with pytest.raises(RedisUnavailable) as info:
        connect_redis(url.replace("h:", "user:pw@h:"), "scheduler")
    assert "bad [redis] url" in str(info.value) and "pw" not in str(info.value) and "\n" not in str(info.value)
