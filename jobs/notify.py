"""Notifications, the part every process shares: which events exist and what a user may ask
for (`--notify-url`, `--mail`, `--notify-on`); docs/ARCHITECTURE.md, "Notifications".
`jobs.notify_events.emit` raises an event outside a state transition.

The transitions themselves raise `end`, `fail`, `held` and `started-late` inside the
TRANSITION script (jobs/scripts.py), so an event exists exactly when its state change does.
Everything here is syntax: whether a URL's host may be reached is the scheduler's to decide
(scheduler/notify/guard.py), since it depends on its configuration and on DNS.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Slurm's --mail-type names, lower-cased, plus what gpulab adds: END is COMPLETED here (not
# every end), FAIL is FAILED (an OOM included), HELD is any move to HELD, STARTED-LATE is a
# start after [notify] started_late_after_s of waiting, IDLE is raised by whoever finds a
# running job idle (`jobs.notify_events.emit`).
EVENTS = ("end", "fail", "held", "started-late", "idle")
DEFAULT_EVENTS = ("end", "fail", "held")
# The state a transition moves to -> the event it raises (the TRANSITION script has the same
# table; a test keeps them equal).
STATE_EVENTS = {"COMPLETED": "end", "FAILED": "fail", "HELD": "held", "RUNNING": "started-late"}
MAX_URL = 2048
MAX_MAIL = 254
_MAIL_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$"
)
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


class NotifyError(ValueError):
    """A notification setting that is not acceptable; `str()` is the user's one line."""


def parse_events(text: str) -> tuple[str, ...]:
    """`end,fail` (Slurm style; `all` = every event) -> events in canonical order."""
    names = [n.strip().lower().replace("_", "-") for n in text.split(",") if n.strip()]
    if not names:
        raise NotifyError(f"give one or more of {', '.join(EVENTS)}, or all")
    if "all" in names:
        return EVENTS
    unknown = [n for n in names if n not in EVENTS]
    if unknown:
        raise NotifyError(f"unknown event '{unknown[0][:40]}'; use {', '.join(EVENTS)} or all")
    return tuple(e for e in EVENTS if e in names)


def check_events(events: Any) -> tuple[str, ...]:
    if not isinstance(events, list | tuple) or not all(isinstance(e, str) and e in EVENTS for e in events):
        raise NotifyError(f"events must be a list of {', '.join(EVENTS)}")
    return tuple(e for e in EVENTS if e in events)


def check_url(url: str) -> str:
    """A webhook URL gpulab is willing to POST to, as far as syntax goes: http or https, a host,
    no credentials in it, no control characters or spaces (they would end up in the request
    line), at most MAX_URL characters. Returns it unchanged."""
    if len(url) > MAX_URL:
        raise NotifyError(f"is longer than {MAX_URL} characters")
    if any(ch.isspace() or not ch.isprintable() or ord(ch) > 126 for ch in url):
        raise NotifyError("may contain only printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise NotifyError(f"is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise NotifyError("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise NotifyError("must not carry a user or password (put a token in the path or query)")
    host = parts.hostname or ""
    if not host or not (_HOST_RE.fullmatch(host) or (":" in host and re.fullmatch(r"[0-9A-Fa-f:.]+", host))):
        raise NotifyError("needs a host name or IP address")
    if port == 0:
        raise NotifyError("port 0 is not a port")
    if parts.fragment:
        raise NotifyError("must not have a #fragment")
    return url


def check_mail(address: str) -> str:
    """One plain address (no display name, no list): nothing that could add a header or a recipient."""
    if len(address) > MAX_MAIL or not _MAIL_RE.fullmatch(address):
        raise NotifyError("must be one address like name@example.org (no name, list or control characters)")
    return address


@dataclass(frozen=True)
class NotifySettings:
    """Where a user's notifications go and for which events (per job, or the user's default)."""

    url: str = ""
    mail: str = ""
    events: tuple[str, ...] = ()

    @property
    def wanted(self) -> bool:
        return bool((self.url or self.mail) and self.events)

    def checked(self) -> NotifySettings:
        """Raise NotifyError naming the option for the first bad field."""
        try:
            if self.url:
                check_url(self.url)
        except NotifyError as exc:
            raise NotifyError(f"--notify-url: {exc}") from None
        try:
            if self.mail:
                check_mail(self.mail)
        except NotifyError as exc:
            raise NotifyError(f"--mail: {exc}") from None
        try:
            check_events(list(self.events))
        except NotifyError as exc:
            raise NotifyError(f"--notify-on: {exc}") from None
        return self

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "mail": self.mail, "events": list(self.events)}

    @classmethod
    def from_json(cls, data: Any) -> NotifySettings:
        if not isinstance(data, dict) or set(data) - {"url", "mail", "events"}:
            raise NotifyError("notify settings must be an object with url, mail and events")
        url, mail = data.get("url", ""), data.get("mail", "")
        if not isinstance(url, str) or not isinstance(mail, str):
            raise NotifyError("url and mail must be strings")
        events = check_events(data.get("events", list(DEFAULT_EVENTS)))
        return cls(url, mail, events).checked()


def settings_json(settings: NotifySettings) -> str:
    return json.dumps(settings.to_json(), sort_keys=True)
