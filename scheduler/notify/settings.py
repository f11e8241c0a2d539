"""Per-user notification settings and secrets (`gpulab notify ...`), and what a submit asks for.

A job's notification settings are fixed when it is submitted, like Slurm's --mail-user: its
own `--notify-url`/`--mail`/`--notify-on`, else its owner's default at that moment. A user's
webhook secret signs every POST to them; it is generated on first need and shown once (in
the answer that created it), and can be rotated or set.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from typing import Any

import redis

from jobs import keys
from jobs.api import ApiError
from jobs.config import Config
from jobs.notify import DEFAULT_EVENTS, NotifyError, NotifySettings, settings_json
from jobs.spec import JobSpec
from scheduler.notify.guard import Refused, networks, resolve_allowed

MIN_SECRET = 16
MAX_SECRET = 256


def defaults(client: redis.Redis, user: str) -> NotifySettings | None:
    raw = client.hget(keys.NOTIFY_DEFAULTS, user)
    if not raw:
        return None
    try:
        return NotifySettings.from_json(json.loads(raw))
    except (ValueError, NotifyError):
        return None  # written by an older version, or by hand: as if unset


def check_reachable(config: Config, settings: NotifySettings) -> None:
    """Refuse (400, exit 2) what could never be delivered, or must not be: mail without an SMTP
    server, a webhook to an internal address (guard.py)."""
    if settings.mail and not config.notify.smtp_host:
        raise ApiError(400, "--mail: this gpulab has no SMTP server ([notify] smtp_host); use --notify-url")
    if settings.url:
        try:
            resolve_allowed(settings.url, networks(config.notify.allow_networks))
        except NotifyError as exc:
            raise ApiError(400, f"--notify-url: {exc}") from None


def ensure_secret(client: redis.Redis, user: str) -> str | None:
    """Create the user's webhook secret if there is none; return it only when created (shown once)."""
    secret = secrets.token_hex(32)
    return secret if client.hsetnx(keys.NOTIFY_SECRETS, user, secret) else None


def secret_of(client: redis.Redis, user: str) -> str:
    ensure_secret(client, user)
    raw = client.hget(keys.NOTIFY_SECRETS, user)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def for_submit(config: Config, client: redis.Redis, user: str, spec: JobSpec) -> tuple[JobSpec, str | None]:
    """The spec with its effective notification settings, checked; and a new secret to show."""
    if not (spec.notify_url or spec.mail):
        default = defaults(client, user)
        if default is None or not default.wanted:
            if spec.notify_on:
                raise ApiError(400, "--notify-on: give --notify-url or --mail (or set a default: gpulab notify set)")
            return spec, None
        spec = replace(spec, notify_url=default.url, mail=default.mail, notify_on=spec.notify_on or default.events)
    if not spec.notify_on:
        spec = replace(spec, notify_on=DEFAULT_EVENTS)
    check_reachable(config, spec.notify)
    return spec, ensure_secret(client, user) if spec.notify_url else None


def show(client: redis.Redis, user: str) -> dict[str, Any]:
    stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.notify_stats(user)).items()}
    default = defaults(client, user)
    return {
        "user": user,
        "default": default.to_json() if default else None,
        "secret_set": bool(client.hexists(keys.NOTIFY_SECRETS, user)),
        "queued": int(client.hget(keys.NOTIFY_QUEUED, user) or 0),
        "sent": int(stats.get("sent", 0)),
        "failed": int(stats.get("failed", 0)),
        "dropped": int(stats.get("dropped", 0)),
        "last_error": stats.get("last_error", ""),
        "last_error_at": float(stats["last_error_at"]) if "last_error_at" in stats else None,
    }


def set_defaults(config: Config, client: redis.Redis, user: str, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "notify settings must be a JSON object")
    if body.get("clear") is True:
        client.hdel(keys.NOTIFY_DEFAULTS, user)
        return {**show(client, user), "secret": None}
    try:
        settings = NotifySettings.from_json(body)
    except NotifyError as exc:
        raise ApiError(400, str(exc)) from None
    if not (settings.url or settings.mail):
        raise ApiError(400, "gpulab notify set: give --url and/or --mail (or --clear)")
    check_reachable(config, settings)
    client.hset(keys.NOTIFY_DEFAULTS, user, settings_json(settings))
    created = ensure_secret(client, user) if settings.url else None
    return {**show(client, user), "secret": created}


def set_secret(client: redis.Redis, user: str, body: Any) -> dict[str, Any]:
    """{"rotate": true}: a new random secret, returned once; {"secret": "..."}: the user's own."""
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    value = body.get("secret")
    if value is not None:
        if not isinstance(value, str) or not MIN_SECRET <= len(value) <= MAX_SECRET or not value.isprintable():
            raise ApiError(400, f"secret: use {MIN_SECRET} to {MAX_SECRET} printable characters")
        if not value.isascii() or " " in value:
            raise ApiError(400, "secret: use ASCII without spaces")
        client.hset(keys.NOTIFY_SECRETS, user, value)
        return {"secret": None, "secret_set": True}
    if body.get("rotate") is True:
        secret = secrets.token_hex(32)
        client.hset(keys.NOTIFY_SECRETS, user, secret)
        return {"secret": secret, "secret_set": True}
    created = ensure_secret(client, user)
    if created is None:
        raise ApiError(409, "a secret is already set (shown when it was made); --rotate makes a new one")
    return {"secret": created, "secret_set": True}


__all__ = ["Refused", "for_submit", "secret_of", "set_defaults", "set_secret", "show"]
