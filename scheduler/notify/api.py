"""The API's notification routes: a user's own settings and secret, nobody else's."""

from __future__ import annotations

from typing import Any

from jobs.api import API_PREFIX, ApiError
from scheduler.notify import settings
from scheduler.service import Caller, SchedulerService


def notify_route(svc: SchedulerService, method: str, path: str, caller: Caller, body: Any) -> Any:
    """GET /v1/notify (show), POST /v1/notify (set or clear the default), POST /v1/notify/secret."""
    if path == f"{API_PREFIX}/notify" and method == "GET":
        return settings.show(svc.redis, caller.user)
    if path == f"{API_PREFIX}/notify" and method == "POST":
        return settings.set_defaults(svc.config, svc.redis, caller.user, body)
    if path == f"{API_PREFIX}/notify/secret" and method == "POST":
        return settings.set_secret(svc.redis, caller.user, body)
    raise ApiError(404, f"no such API path: {method} {path}")
