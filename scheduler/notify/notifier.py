"""The notifier: turns job events into webhook POSTs and mails, off the scheduling loop.

Two threads in the scheduler process, each with nothing to do with the loop:

- intake: reads `gpulab:notify:events` as a member of a consumer group (so an event is read
  by one notifier, and one that dies leaves its events pending for the next), turns each into
  its deliveries (one per channel) and stores them in the outbox, acknowledging the event in
  the same script (NOTIFY_INTAKE). A user over [notify] max_queued_per_user loses new
  deliveries (counted, `gpulab notify show`), never the scheduler its memory.
- sender: claims due deliveries (NOTIFY_CLAIM pushes them a lease ahead, so a notifier that
  dies mid-send leaves them due again), groups them per user, channel and destination, and
  hands each group's next batch (at most max_batch events) to a small thread pool, at most
  one batch in flight per user and channel and max_per_minute per user and channel. A
  failure is retried with exponential backoff up to max_attempts (NOTIFY_SETTLE).

Delivery is at least once: a notifier that dies after the receiver answered but before
settling sends again. Every event has a delivery id (`<stream entry id>:<channel>`), the same
on every attempt, in the POST's JSON and the mail's X-Gpulab-Delivery header, for dedupe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from jobs import keys, scripts
from jobs.config import Config
from jobs.notify import EVENTS
from jobs.record import JobRecord
from jobs.redis_conn import queue_script
from jobs.store import JobStore
from jobs.text import safe
from scheduler.notify import mail, settings, webhook
from scheduler.notify.guard import RESOLVE_TIMEOUT_S, networks
from scheduler.notify.pool import DaemonPool

log = logging.getLogger("gpulab.notify")
CLAIM_LIMIT = 1000
RECLAIM_IDLE_MS = 60_000  # events another notifier read but did not acknowledge for this long
TICK_S = 0.5
PHRASES = {
    "end": "completed",
    "fail": "failed",
    "held": "is held",
    "started-late": "started after a long wait",
    "idle": "is idle",
}


@dataclass
class _Bucket:
    """Per user and channel: at most `per_minute` sends a minute (a burst of as many)."""

    tokens: float
    at: float

    def take(self, per_minute: int, now: float) -> float:
        """0 if a send may go now (and count it), else seconds until one may."""
        if per_minute <= 0:
            return 0.0
        self.tokens = min(float(per_minute), self.tokens + (now - self.at) * per_minute / 60.0)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) * 60.0 / per_minute


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before attempt `attempts + 1`: base, 2 base, 4 base, ... capped at max_s."""
    return float(min(max_s, base_s * 2 ** max(0, attempts - 1)))


def job_summary(record: JobRecord) -> dict[str, Any]:
    """What a notification says about a job: its owner's view, without command or environment."""
    waited = record.started_at - record.submitted_at if record.started_at else None
    return {
        "id": record.id,
        "name": record.spec.display_name,
        "user": record.user,
        "state": record.state.value,
        "reason": record.reason,
        "detail": record.detail[:500],
        "exit_code": record.exit_code,
        "node": record.node,
        "attempt": record.attempt,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "waited_s": waited,
        "array_id": record.array_id,
        "array_index": record.array_index,
    }


def deliveries(
    entry_id: str, fields: dict[str, str], record: JobRecord, started_late_after_s: float
) -> list[dict[str, Any]]:
    """The deliveries one event makes (none if the job did not ask for it)."""
    event = fields.get("event", "")
    spec = record.spec
    if event not in EVENTS or event not in spec.notify_on or not (spec.notify_url or spec.mail):
        return []
    waited = None if record.started_at is None else record.started_at - record.submitted_at
    if event == "started-late" and (waited is None or waited < started_late_after_s):
        return []
    base = {
        "user": record.user,
        "event": event,
        "at": float(fields.get("at") or time.time()),
        "detail": fields.get("detail", "")[:500],
        "job": job_summary(record),
        "attempts": 0,
    }
    out = []
    for channel, target in (("webhook", spec.notify_url), ("mail", spec.mail)):
        if target:
            out.append({**base, "id": f"{entry_id}:{channel}", "channel": channel, "target": target})
    return out


def webhook_body(user: str, items: list[dict[str, Any]], now: float) -> bytes:
    events = [{k: item[k] for k in ("id", "event", "at", "detail", "job")} for item in items]
    return json.dumps({"version": 1, "user": user, "sent_at": now, "events": events}, sort_keys=True).encode()


def batch_id(items: list[dict[str, Any]]) -> str:
    return hashlib.sha256(",".join(item["id"] for item in items).encode()).hexdigest()[:32]


def mail_text(items: list[dict[str, Any]]) -> tuple[str, str]:
    """Subject and body of one mail for a batch of one user's events (escaped: job-written text)."""
    first = items[0]
    job = first["job"]
    if len(items) == 1:
        subject = f"gpulab: job {job['id']} ({safe(job['name'], 60)}) {PHRASES[first['event']]}"
    else:
        counts: dict[str, int] = defaultdict(int)
        for item in items:
            counts[item["event"]] += 1
        subject = f"gpulab: {len(items)} job events (" + ", ".join(f"{n} {e}" for e, n in sorted(counts.items())) + ")"
    lines = []
    for item in items:
        j = item["job"]
        line = f"job {j['id']} {safe(j['name'], 60)}: {PHRASES[item['event']]} - {j['state']}"
        if j.get("reason"):
            line += f" {safe(j['reason'], 60)}"
        if j.get("exit_code") is not None:
            line += f" exit {j['exit_code']}"
        if j.get("detail"):
            line += f" ({safe(j['detail'], 200)})"
        if item.get("detail"):
            line += f" - {safe(item['detail'], 200)}"
        if j.get("node"):
            line += f" on {safe(j['node'], 60)}"
        lines.append(line + f"  [delivery {item['id']}]")
    lines += ["", "Details: gpulab show ID. Settings: gpulab notify show."]
    return subject, "\n".join(lines) + "\n"


class Notifier:
    def __init__(self, config: Config, client: redis.Redis, consumer: str = "") -> None:
        self.config = config
        self.cfg = config.notify
        self.redis = client
        self.store = JobStore(client)
        self.allow = networks(self.cfg.allow_networks)
        # Stable across restarts (a restarted notifier reads its own unacknowledged events
        # first) and distinct per scheduler: every scheduler, leader or standby, runs one.
        self.consumer = consumer or f"{socket.gethostname()}:{config.socket_path}"
        self._intake = client.register_script(scripts.NOTIFY_INTAKE)
        self._claim = client.register_script(scripts.NOTIFY_CLAIM)
        self._settle = client.register_script(scripts.NOTIFY_SETTLE)
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._claimed: set[str] = set()  # ids of deliveries being sent by this process
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Daemon threads: a stop never waits for a send (scheduler/notify/pool.py).
        self._pool = DaemonPool(max_workers=max(1, self.cfg.max_parallel), thread_name_prefix="notify-send")

    # ---- threads ------------------------------------------------------------------------------
    def start(self, stop: threading.Event) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._forever, args=(self.intake_once, stop), name="notify-intake", daemon=True),
            threading.Thread(target=self._forever, args=(self.send_once, stop), name="notify-send", daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def _forever(self, step: Callable[[], None], stop: threading.Event) -> None:
        """Run `step` until stopped; nothing a user sent and no Redis outage ends the thread."""
        delay = TICK_S
        while not stop.is_set():
            try:
                step()
                delay = TICK_S
            except redis.RedisError as exc:
                log.warning("notify: redis: %s; retrying in %.0fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception:
                log.exception("notify: unexpected error; going on")
                stop.wait(delay)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- intake -------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        try:  # from id 0: events raised before any notifier ran are delivered too
            self.redis.xgroup_create(keys.NOTIFY_EVENTS, keys.NOTIFY_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def intake_once(self, block_ms: int = 1000) -> int:
        """Move one read's worth of events into the outbox; return how many events were read."""
        self.ensure_group()
        # Ours first (read before a restart, not acknowledged), then others' left too long, then new.
        entries = self._read("0", None) or self._reclaim() or self._read(">", block_ms)
        self._take(entries)
        if entries:
            self._wake.set()
        return len(entries)

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        reply = self.redis.xreadgroup(
            keys.NOTIFY_GROUP, self.consumer, {keys.NOTIFY_EVENTS: start}, count=200, block=block_ms
        )
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields is None:  # trimmed away while pending
                    self.redis.xack(keys.NOTIFY_EVENTS, keys.NOTIFY_GROUP, entry_id)
                    continue
                out.append((_text(entry_id), {_text(k): _text(v) for k, v in fields.items()}))
        return out

    def _reclaim(self) -> list[tuple[str, dict[str, str]]]:
        reply = self.redis.xautoclaim(
            keys.NOTIFY_EVENTS, keys.NOTIFY_GROUP, self.consumer, RECLAIM_IDLE_MS, start_id="0-0", count=200
        )
        return [(_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in reply[1] if f]

    def _take(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Each event's deliveries into the outbox, the event acknowledged with them: the
        records in one round trip, the scripts in one pipeline (a burst of 10,000 ends)."""
        job_ids = {int(f["job"]) for _, f in entries if f.get("job", "").isdigit() and len(f["job"]) < 16}
        records = {r.id: r for r in self.store.get_many(sorted(job_ids), invalid={})}
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields in entries:
            job = fields.get("job", "")
            record = records.get(int(job)) if job.isdigit() and len(job) < 16 else None
            user = record.user if record is not None else ""
            items = deliveries(entry_id, fields, record, self.cfg.started_late_after_s) if record else []
            pairs = [x for item in items for x in (item["id"], json.dumps(item, sort_keys=True))]
            intake_keys = [keys.NOTIFY_OUTBOX, keys.NOTIFY_DUE, keys.NOTIFY_QUEUED, keys.notify_stats(user)]
            queue_script(
                pipe,
                self._intake,
                [*intake_keys, keys.NOTIFY_EVENTS],
                [keys.NOTIFY_GROUP, entry_id, user, self.cfg.max_queued_per_user, repr(time.time()), *pairs],
            )
        pipe.execute()

    # ---- sending ------------------------------------------------------------------------------
    def send_once(self) -> int:
        """Start the batches that may go now; return how many were started."""
        self._wake.wait(TICK_S)
        self._wake.clear()
        now = time.time()
        lease = now + self.claim_lease_s
        flat = self._claim(keys=[keys.NOTIFY_DUE, keys.NOTIFY_OUTBOX], args=[repr(now), repr(lease), CLAIM_LIMIT])
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for i in range(0, len(flat), 2):
            try:
                item = json.loads(flat[i + 1])
                groups[(item["user"], item["channel"], item["target"])].append(item)
            except (ValueError, KeyError, TypeError):
                self.redis.hdel(keys.NOTIFY_OUTBOX, flat[i])  # not ours to understand: drop it
        started = 0
        later: dict[str, float] = {}
        for (user, channel, target), items in groups.items():
            items.sort(key=lambda it: _entry_order(it["id"]))
            with self._lock:
                busy = (user, channel) in self._in_flight
                wait = 0.2 if busy else self._bucket(user, channel).take(self.cfg.max_per_minute, now)
                if not wait:
                    self._in_flight.add((user, channel))
            batch = items[: max(1, self.cfg.max_batch)]
            rest = items[len(batch) :] if not wait else items
            for item in rest:  # due again when this user and channel may send (a claim lease otherwise)
                later[item["id"]] = now + (wait or 0.05)
            if not wait:
                with self._lock:
                    self._claimed.update(item["id"] for item in batch)
                self._pool.submit(self._deliver, user, channel, target, batch)
                started += 1
        if later:
            self.redis.zadd(keys.NOTIFY_DUE, later, xx=True)
        return started

    @property
    def claim_lease_s(self) -> float:
        """Longer than any one send may take: a webhook's deadline plus a DNS lookup per hop,
        and an SMTP conversation of a few timed operations. A notifier killed mid-send
        leaves its claims due again after this."""
        webhook_s = self.cfg.webhook_timeout_s + RESOLVE_TIMEOUT_S * (webhook.MAX_REDIRECTS + 1)
        mail_s = 4 * self.cfg.smtp_timeout_s if self.cfg.smtp_host else 0.0
        return max(webhook_s, mail_s) + 10.0

    def close(self) -> None:
        """On a clean stop: what this process claimed but has not settled is due again now
        (for the next notifier) instead of when its claim lease ends. A send that still
        finishes may then be made twice: at least once, ids for dedupe."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            claimed = dict.fromkeys(self._claimed, time.time())
        if claimed:
            try:
                self.redis.zadd(keys.NOTIFY_DUE, claimed, xx=True)
            except redis.RedisError as exc:
                log.warning("notify: could not hand back %d claimed deliveries: %s", len(claimed), exc)

    def _bucket(self, user: str, channel: str) -> _Bucket:
        return self._buckets.setdefault((user, channel), _Bucket(float(self.cfg.max_per_minute), time.time()))

    def _deliver(self, user: str, channel: str, target: str, items: list[dict[str, Any]]) -> None:
        try:
            ok, retry, error = self._send(user, channel, target, items)
            self._after(user, items, ok, retry, error)
        except Exception:  # e.g. Redis away while settling: the claim lease makes them due again
            log.exception("notify: delivery to %s failed unexpectedly", user)
        finally:
            with self._lock:
                self._in_flight.discard((user, channel))
                self._claimed.difference_update(item["id"] for item in items)
            self._wake.set()

    def _send(self, user: str, channel: str, target: str, items: list[dict[str, Any]]) -> tuple[bool, bool, str]:
        if channel == "webhook":
            body = webhook_body(user, items, time.time())
            headers = {
                "X-Gpulab-Signature": webhook.signature(settings.secret_of(self.redis, user), body),
                "X-Gpulab-Delivery": batch_id(items),
                "X-Gpulab-Event": items[0]["event"] if len(items) == 1 else "batch",
            }
            outcome = webhook.post(target, body, headers, self.allow, self.cfg.webhook_timeout_s)
            return outcome.ok, outcome.retry, outcome.error
        if not self.cfg.smtp_host:
            return False, False, "no SMTP server configured ([notify] smtp_host)"
        subject, text = mail_text(items)
        try:
            message = mail.build(self.cfg, target, subject, text, ",".join(it["id"] for it in items))
            mail.send(self.cfg, message)
        except mail.MailFailed as exc:
            return False, exc.retry, str(exc)
        except ValueError as exc:  # a header email refuses (an address that slipped past the checks)
            return False, False, f"mail refused: {exc}"
        return True, False, ""

    def _after(self, user: str, items: list[dict[str, Any]], ok: bool, retry: bool, error: str) -> None:
        now = time.time()
        stats_keys = [keys.NOTIFY_OUTBOX, keys.NOTIFY_DUE, keys.NOTIFY_QUEUED, keys.notify_stats(user)]
        if ok:
            self._settle(keys=stats_keys, args=[user, "sent", repr(now), "", "", *[it["id"] for it in items]])
            return
        attempts = int(items[0].get("attempts", 0)) + 1
        line = safe(f"{items[0]['channel']} to {items[0]['target'][:80]}: {error}", 300)
        if not retry or attempts >= self.cfg.max_attempts:
            log.info("notify: giving up on %d deliveries to %s after %d attempts: %s", len(items), user, attempts, line)
            self._settle(keys=stats_keys, args=[user, "failed", repr(now), "", line, *[it["id"] for it in items]])
            return
        wait = backoff_s(attempts, self.cfg.retry_base_s, self.cfg.retry_max_s) * random.uniform(0.9, 1.1)
        pairs = [x for it in items for x in (it["id"], json.dumps({**it, "attempts": attempts}, sort_keys=True))]
        self._settle(keys=stats_keys, args=[user, "retry", repr(now), repr(now + wait), line, *pairs])


def _entry_order(delivery_id: str) -> tuple[int, int]:
    ms, _, seq = delivery_id.split(":", 1)[0].partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and seq.isdigit() else (0, 0)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def start_notifier(config: Config, client: redis.Redis, stop: threading.Event) -> Notifier | None:
    """The notifier's threads in this process ([notify] enabled); None when switched off."""
    if not config.notify.enabled:
        return None
    notifier = Notifier(config, client)
    notifier.start(stop)
    return notifier
