"""`gpulab doctor`: one line per check (ok / WARN / FAIL) with what to fix; exit 1 on a FAIL.

An admin tool: unlike the rest of the CLI it reads the configured Redis URL and talks to
Redis directly, because half of what it checks is Redis itself.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click
import redis

from cli.client import ApiClient, DaemonUnreachable
from jobs import keys
from jobs.config import Config, ConfigError
from jobs.invariants import violations
from jobs.redis_conn import BadRedisUrl, describe_error, make_client, redact
from jobs.text import safe
from scheduler.redis_server import is_local

SKEW_WARN_S = 1.0
SKEW_FAIL_S = 30.0


@dataclass(frozen=True)
class Check:
    level: str  # "ok", "WARN" or "FAIL"
    name: str
    message: str


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_persistence(client: redis.Redis) -> Iterator[Check]:
    wanted = {"appendonly": ("yes",), "appendfsync": ("everysec", "always"), "maxmemory-policy": ("noeviction",)}
    try:
        raw = client.config_get("*")
        config = {_text(k): _text(v) for k, v in raw.items()}
    except redis.ResponseError as exc:
        yield Check("WARN", "redis persistence", f"cannot read CONFIG ({exc}); make sure of {wanted}")
        return
    for key, good in wanted.items():
        value = config.get(key, "?")
        if value in good:
            yield Check("ok", f"redis {key}", value)
        else:
            fix = f"set '{key} {good[0]}' in redis.conf (see contrib/systemd/redis-gpulab.conf)"
            yield Check("FAIL" if key == "maxmemory-policy" else "WARN", f"redis {key}", f"is {value}: {fix}")


def check_invariants(client: redis.Redis) -> Iterator[Check]:
    """The ledger, leases and indexes agree (docs/ARCHITECTURE.md, "Invariants"), and no record
    was quarantined."""
    problems = violations(client)
    for problem in problems:
        yield Check("FAIL", "invariants", problem)
    if not problems:
        yield Check("ok", "invariants", "ledger = active jobs' reservations; every lease has a live job")
    quarantined = client.xlen(keys.QUARANTINE)
    if quarantined:
        last = client.xrevrange(keys.QUARANTINE, count=1)[0][1]
        job, why = _text(last.get(b"job", b"?")), _text(last.get(b"why", b"?"))
        yield Check("WARN", "quarantine", f"{quarantined} invalid job records failed; last: job {job}: {why}")


def check_clocks(client: redis.Redis, config: Config) -> Iterator[Check]:
    seconds, micros = client.time()
    redis_now = seconds + micros / 1e6
    skew = time.time() - redis_now
    level = "FAIL" if abs(skew) > SKEW_FAIL_S else "WARN" if abs(skew) > SKEW_WARN_S else "ok"
    fix = "; run chrony/ntp" if level != "ok" else ""
    yield Check(level, "clock vs redis", f"this host is {skew:+.3f}s off Redis{fix}")
    names = sorted(n.decode() for n in client.smembers(keys.NODES))
    if not names:
        yield Check("FAIL", "workers", "no worker has ever registered; start `gpulab worker` on each GPU host")
        return
    alive = 0
    slack = max(SKEW_WARN_S, 2 * config.worker.heartbeat_interval_s)
    for name, raw in zip(names, client.mget([keys.node(n) for n in names]), strict=True):
        if raw is None:
            yield Check("WARN", f"worker {name}", "no heartbeat (down or stopped); restart it or ignore a retired node")
            continue
        alive += 1
        age = redis_now - float(json.loads(raw).get("sent_at", 0.0))
        if -SKEW_WARN_S <= age <= slack:
            yield Check("ok", f"worker {name}", f"heartbeat {age:.2f}s old")
        else:
            why = "its clock is ahead of Redis" if age < 0 else "heartbeats are late or its clock is behind"
            message = f"heartbeat sent_at is {age:+.2f}s from Redis time: {why}; run chrony/ntp"
            yield Check("WARN", f"worker {name}", message)
    if not alive:
        yield Check("FAIL", "workers", "no worker is heartbeating; start `gpulab worker` (systemd: gpulab-worker)")


def check_leader(client: redis.Redis, config: Config) -> Iterator[Check]:
    """One scheduler holds the leader lease (docs/ARCHITECTURE.md, "Leader and fencing")."""
    from scheduler.leader import read_leader

    view = read_leader(client, alive_within_s=max(3 * config.scheduler.leader_lease_s, 10.0))
    alive = f"{len(view.alive)} scheduler(s) alive"
    if view.holder is None:
        if view.alive:
            fix = "the leader died moments ago (retry in a few seconds), or the schedulers cannot write to Redis"
            yield Check("FAIL", "leader", f"no scheduler holds the leader lease while {alive}: {fix}")
        else:
            yield Check("FAIL", "leader", "no scheduler is alive: start `gpulab scheduler` (or `gpulab up`)")
        return
    held = f"held for {view.held_for_s:.1f}s" if view.held_for_s is not None else "held"
    renewed = f", renewed {view.renewed_ago_s:.2f}s ago" if view.renewed_ago_s is not None else ""
    yield Check("ok", "leader", f"{view.holder}, epoch {view.epoch}, {held}{renewed}; {alive}")


def check_redis(config: Config) -> Iterator[Check]:
    url = config.effective_redis_url
    try:
        password = config.redis_password()
        embedded = config.state_dir / "redis.password"
        if password is None and is_local(url) and embedded.is_file():
            # `gpulab up`'s private Redis: its password is in the state dir (cli/stack.py), given
            # to the daemons it starts; doctor, run from another shell, reads it there too.
            password = embedded.read_text().strip() or None
    except OSError as exc:
        yield Check("FAIL", "redis password", f"cannot read {config.state_dir / 'redis.password'}: {exc.strerror}")
        return
    except ConfigError as exc:
        yield Check("FAIL", "redis password", str(exc))
        return
    try:
        client = make_client(url, password, timeout_s=5)  # redis://, unix://, redis+sentinel://
    except BadRedisUrl as exc:
        yield Check("FAIL", "redis", f"bad [redis] url: {exc}")
        return
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        yield Check("FAIL", "redis", f"{redact(url)} refused the credentials ({exc}); check [redis] password_file")
        return
    except redis.RedisError as exc:
        why = describe_error(url, exc)
        yield Check("FAIL", "redis", f"cannot reach {redact(url)} ({why}); start it (`gpulab up`, or redis-gpulab)")
        return
    try:
        yield Check("ok", "redis", f"reachable at {redact(url)}")
        from cli.doctor_nodes import check_daemons  # it builds on this module's Check

        steps: tuple[tuple[str, Callable[[], Iterator[Check]]], ...] = (
            ("redis persistence", lambda: check_persistence(client)),
            ("clocks", lambda: check_clocks(client, config)),
            ("leader", lambda: check_leader(client, config)),
            ("daemons", lambda: check_daemons(client)),
            ("invariants", lambda: check_invariants(client)),
        )
        for name, step in steps:
            try:
                yield from step()
            except redis.RedisError as exc:  # a command this Redis user may not run, Redis gone
                yield Check("FAIL", name, f"Redis refused or did not answer: {describe_error(url, exc)}")
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # stored data of another shape
                yield Check("FAIL", name, f"cannot read what is stored ({type(exc).__name__}: {exc})")
    finally:
        client.close()


def check_nvml(config: Config) -> Check:
    if config.worker.simulate_gpus:
        return Check("ok", "gpus", f"simulated from config: {', '.join(config.worker.simulate_gpus)}")
    from worker.nvml_probe import nvml_available

    if nvml_available():
        return Check("ok", "gpus", "NVML readable")
    return Check("WARN", "gpus", "NVML not readable here: fine on a head node; on a GPU host install the driver")


def check_socket(config: Config) -> Iterator[Check]:
    path = config.socket_path
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        yield Check("FAIL", "scheduler socket", f"{path} does not exist; start `gpulab scheduler` (or `gpulab up`)")
        return
    if mode & 0o666 != 0o666:
        yield Check("WARN", "socket permissions", f"{path} is {mode:o}; users other than its owner cannot submit")
    try:
        ApiClient(path, timeout_s=5).request("GET", "/v1/health")
    except DaemonUnreachable as exc:
        yield Check("FAIL", "scheduler socket", str(exc))
        return
    yield Check("ok", "scheduler socket", f"{path} answers (mode {mode:o})")


def run_doctor(config: Config, as_json: bool = False) -> int:
    checks = [*check_redis(config), check_nvml(config), *check_socket(config)]
    code = 1 if any(c.level == "FAIL" for c in checks) else 0
    if as_json:  # the messages as they are: JSON escapes what a terminal must not see
        rows = [{"level": c.level, "check": c.name, "message": c.message} for c in checks]
        click.echo(json.dumps({"ok": code == 0, "checks": rows}, indent=2, sort_keys=True))
        return code
    for check in checks:
        style = {"ok": "green", "WARN": "yellow", "FAIL": "red"}[check.level]
        level = click.style(f"{check.level:<4}", fg=style) if not os.environ.get("NO_COLOR") else f"{check.level:<4}"
        click.echo(f"{level}  {check.name}: {safe(check.message, 1000)}")  # it may quote a stored record
    return 1 if any(c.level == "FAIL" for c in checks) else 0
