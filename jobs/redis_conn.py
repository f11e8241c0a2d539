"""Daemons' Redis connections: one URL, retries with backoff, one clear line when down.

A URL is `redis://`, `rediss://` (TLS), `unix://`, or, for a Sentinel-managed primary with
replicas, `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`: the client
asks the sentinels where the primary is, and asks again after a failover (README "Several
hosts"). The password is the data nodes'; the sentinels are asked without one.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

SENTINEL_SCHEME = "redis+sentinel"


class RedisUnavailable(RuntimeError):
    pass


def redact(url: str) -> str:
    """The URL without its password, for messages and logs. Read as a plain string, not parsed:
    a password with an unescaped '/', '?' or '#' (a generated one) moves urllib's idea of
    where the password ends, and pieces of it were shown. Everything between '://' and the
    last '@' after the user name is masked, and a `password=` in the query."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{host}"
    return scheme + sep + re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", rest)


def _unparsable(url: str, why: object) -> BadRedisUrl:
    """A URL urllib or redis-py refused. With credentials in it, their message may quote a
    piece of the password (the 'port' of a password with a '/'), so it is not shown."""
    if "@" in url:
        why = (
            "it does not parse; a password with '/', '?', '#' or '@' must be percent-encoded "
            "(or give it in [redis] password_file)"
        )
    return BadRedisUrl(f"{redact(url)}: {why}")


class _SentinelConnection(SentinelManagedConnection):  # type: ignore[misc]  # untyped in redis-py
    """redis-py's Sentinel connection keeps the connection when a read is interrupted (its
    read_response defaults to disconnect_on_error=False, unlike a plain Connection). A reply
    never read then stays on it: RQ's SIGTERM handler interrupting its blocking BLMOVE left
    the next command (RQ's register_death) waiting behind the BLMOVE for up to RQ's 415 s
    socket timeout, and a worker that would not stop. Drop such a connection, as a plain
    one does."""

    def read_response(self, disable_decoding: bool = False, *, disconnect_on_error: bool = True, **kwargs: Any) -> Any:
        return super().read_response(
            disable_decoding=disable_decoding, disconnect_on_error=disconnect_on_error, **kwargs
        )


class _Sentinel(Sentinel):  # type: ignore[misc]  # untyped in redis-py
    """redis-py's MasterNotFoundError names each sentinel by the repr of its whole client
    (about 1 KB each): every retry of a daemon cut off from the sentinels logged that (the
    leader thread every 0.5 s). The same error, in one short line."""

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)
        except MasterNotFoundError:
            where = ",".join(
                f"{c.connection_pool.connection_kwargs.get('host')}:{c.connection_pool.connection_kwargs.get('port')}"
                for c in self.sentinels
            )
            raise MasterNotFoundError(f"no sentinel ({where}) answered with a primary named {service_name!r}") from None


class BadRedisUrl(ValueError):
    """The URL does not parse; `str()` is the one line to print."""


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """`redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _unparsable(url, f"each sentinel must be HOST:PORT, got {item.strip()!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise BadRedisUrl(f"{redact(url)}: the path must be /SERVICE_NAME or /SERVICE_NAME/DB")
    return SentinelUrl(
        sentinels,
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(user) or None,
        unquote(password) or None,
    )


PLAIN_SCHEMES = ("redis", "rediss", "unix")


def check_plain_url(url: str) -> None:
    """`redis://`, `rediss://` and `unix://` URLs that redis-py would refuse with a bare
    ValueError (a traceback in every daemon), or read wrongly: a path that is not a database
    number is silently db 0 there, which may be another lab's data."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError: not a number, or out of range
    except ValueError as exc:
        raise _unparsable(url, exc) from None
    if parts.scheme not in PLAIN_SCHEMES:
        raise BadRedisUrl(
            f"{redact(url)}: the scheme must be redis://, rediss://, unix:// or {SENTINEL_SCHEME}://"
        )  # fmt: skip
    if parts.scheme != "unix":
        if not parts.hostname:
            raise BadRedisUrl(f"{redact(url)}: no host")
        if port == 0:
            raise BadRedisUrl(f"{redact(url)}: port 0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise _unparsable(url, f"the path must be the database number (/0, /1, ...), got /{db}")
    elif not parts.path:
        raise BadRedisUrl(f"{redact(url)}: no socket path (unix:///PATH/redis.sock)")
    for name, value in parse_qsl(parts.query):
        if name == "db" and not value.isdigit():
            raise BadRedisUrl(f"{redact(url)}: db={value} is not a database number")


def _keepalive_options() -> dict[int, int]:
    """A TCP peer that vanished (host down, network cut, a failed-over primary's machine) is
    noticed in about 10 s even on a connection idle in a long blocking read, where only the
    socket timeout would catch it otherwise."""
    wanted = {"TCP_KEEPIDLE": 3, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 10_000}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def make_client(url: str, password: str | None = None, timeout_s: float = 15) -> redis.Redis:
    """`rediss://` URLs get TLS from redis-py. A password in the URL wins over `password`.
    `timeout_s` bounds every call: a daemon whose lease depends on its next call (a worker's
    heartbeat) passes a fraction of that lease."""
    # Blocking reads (BLPOP, XREAD) block for at most 2 s, well inside the socket timeout.
    options = {
        "socket_connect_timeout": min(5, timeout_s),
        "socket_timeout": timeout_s,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
    }
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket, in any scheme
        raise _unparsable(url, exc) from None
    if scheme != "unix":  # a Unix socket's connection takes no TCP options
        options |= {"socket_keepalive": True, "socket_keepalive_options": _keepalive_options()}
    if scheme == SENTINEL_SCHEME:
        target = parse_sentinel_url(url)
        sentinel = _Sentinel(target.sentinels, sentinel_kwargs={"socket_timeout": 2, "socket_connect_timeout": 2})
        # The pool asks the sentinels for the primary on every new connection: after a
        # failover the retries land on the new one (and READONLY from a demoted one drops the
        # connection).
        client: redis.Redis = sentinel.master_for(
            target.service,
            db=target.db,
            username=target.username,
            password=target.password or password,
            connection_class=_SentinelConnection,
            **options,
        )
        return client
    check_plain_url(url)
    try:
        return redis.Redis.from_url(url, password=password, **options)
    except ValueError as exc:  # anything else redis-py's parser refuses
        raise _unparsable(url, exc) from None


def describe_error(url: str, exc: redis.RedisError) -> str:
    """One short line for why Redis did not answer. redis-py's MasterNotFoundError carries
    the repr of a whole client (a few thousand characters): say what it means instead."""
    if isinstance(exc, MasterNotFoundError):
        try:
            target = parse_sentinel_url(url)
        except BadRedisUrl:
            return "no sentinel knows the primary"
        where = ",".join(f"{h}:{p}" for h, p in target.sentinels)
        return (
            f"no sentinel at {where} answered with a primary named {target.service!r} "
            "(are the sentinels up, and is that the service name of `sentinel monitor`?)"
        )
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def connect_redis(url: str, who: str, password: str | None = None, timeout_s: float = 15) -> redis.Redis:
    """A client that has answered PING, or RedisUnavailable naming the URL and the cause."""
    try:
        client = make_client(url, password, timeout_s)
    except BadRedisUrl as exc:
        raise RedisUnavailable(f"{who}: bad [redis] url: {exc}") from None
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        hint = "" if password else " (set [redis] password_file or GPULAB_REDIS_PASSWORD)"
        raise RedisUnavailable(f"{who}: Redis at {redact(url)} refused the credentials: {exc}{hint}") from None
    except redis.RedisError as exc:
        raise RedisUnavailable(f"{who}: cannot reach Redis at {redact(url)}: {describe_error(url, exc)}") from None
    return client


def queue_script(pipe: Any, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Queue a registered script (`client.register_script`) on a pipeline as EVAL of its
    text. Queued as itself, redis-py sends SCRIPT EXISTS before the pipeline, one more round
    trip at every execute: a third of the worker's log shipping in a drain of 1,000 jobs
    (py-spy). Redis keeps the compiled script by its hash, so EVAL costs only the text on the
    wire (< 5 KiB), and it cannot fail NOSCRIPT inside a MULTI."""
    return pipe.eval(script.script, len(keys), *keys, *args)
