"""Notifications on the real stack: a real scheduler and worker, a real HTTP receiver in a
thread and a real SMTP server (aiosmtpd). One stack for the module."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from jobs import keys
from jobs.config import Config, NotifyConfig
from jobs.notify_events import emit
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.store import JobStore
from scheduler.notify.notifier import Notifier
from scheduler.redis_server import RedisServer
from tests.helpers.receivers import SmtpReceiver, WebhookReceiver
from tests.helpers.stack import Stack, eventually, free_port, test_config

pytestmark = pytest.mark.timeout(300)
RETRY = {"retry_base_s": 0.3, "retry_max_s": 1.0, "webhook_timeout_s": 2.0, "max_attempts": 50, "max_per_minute": 0}


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpReceiver]:
    server = SmtpReceiver(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def notify_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, smtp: SmtpReceiver
) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    notify = {
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.port,
        "allow_networks": ["127.0.0.0/8"],
        "started_late_after_s": 0.0,  # every start is late: only jobs that ask for started-late hear of it
        **RETRY,
    }
    stack = Stack(tmp_path_factory.mktemp("notify"), redis_server.url, client, test_config(notify=notify))
    stack.start_scheduler()
    stack.start_worker()
    yield stack
    stack.stop()
    client.close()


def _secret(stack: Stack) -> str:
    """The user's webhook secret: rotated here, so the test knows it (it is shown once)."""
    result = stack.cli("notify", "secret", "--rotate")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _quick_job() -> list[str]:
    return ["--", sys.executable, "-c", "pass"]


def test_completed_job_sends_one_signed_post_and_one_mail(
    notify_stack: Stack, receiver: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    secret = _secret(notify_stack)
    job = notify_stack.submit("--notify-url", receiver.url(), "--mail", "alice@example.org", *_quick_job())
    notify_stack.wait_state(job, JobState.COMPLETED)
    mails = eventually(lambda: smtp.messages_to("alice@example.org"))
    posts = eventually(lambda: [p for p in receiver.posts if any(e["job"]["id"] == job for e in p.json["events"])])
    # One event per channel. At least once: on a loaded machine a slow answer may be sent
    # again, always with the same delivery id, which is what a receiver deduplicates on.
    assert len(_unique(receiver.events(job))) == 1
    assert len({m["X-Gpulab-Delivery"] for m in mails}) == 1
    post = posts[0]
    expected = "sha256=" + hmac.new(secret.encode(), post.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(post.headers["x-gpulab-signature"], expected)
    (event,) = post.json["events"]
    assert event["event"] == "end" and event["job"]["state"] == "COMPLETED" and event["job"]["exit_code"] == 0
    assert event["id"].endswith(":webhook")
    assert f"job {job}" in mails[0]["Subject"] and "completed" in mails[0]["Subject"]
    assert mails[0]["X-Gpulab-Delivery"].endswith(":mail")
    # Nothing more comes for this job: the start was not late, and there is one event per channel.
    eventually(lambda: _show(notify_stack)["queued"] == 0)  # settled once the receivers answered
    assert _show(notify_stack)["sent"] >= 2


def test_failed_job_notifies_fail_not_end(notify_stack: Stack, receiver: WebhookReceiver) -> None:
    job = notify_stack.submit("--notify-url", receiver.url(), "--notify-on", "fail", "--", "false")
    notify_stack.wait_state(job, JobState.FAILED)
    (event,) = _unique(eventually(lambda: receiver.events(job)))
    assert event["event"] == "fail" and event["job"]["exit_code"] == 1


def test_held_and_started_late_are_notified_when_asked_for(notify_stack: Stack, receiver: WebhookReceiver) -> None:
    blocker = notify_stack.submit("--hold", *_quick_job())
    waiting = notify_stack.submit(
        "--notify-url", receiver.url(), "--notify-on", "held", "--after", str(blocker), "--", "true"
    )
    assert notify_stack.cli("hold", str(waiting)).returncode == 0
    (held,) = _unique(eventually(lambda: receiver.events(waiting)))
    assert held["event"] == "held" and held["job"]["state"] == "HELD"
    late = notify_stack.submit("--notify-url", receiver.url(), "--notify-on", "started-late,end", *_quick_job())
    notify_stack.wait_state(late, JobState.COMPLETED)
    events = eventually(lambda: len(_unique(receiver.events(late))) == 2 and _unique(receiver.events(late)))
    assert sorted(e["event"] for e in events) == ["end", "started-late"]
    assert all(e["job"]["waited_s"] is not None for e in events)
    for job in (blocker, waiting):
        notify_stack.cli("cancel", str(job))


def test_receiver_down_then_up_gets_every_delivery_once_after_dedupe(notify_stack: Stack) -> None:
    """The receiver is down (nothing listens), the scheduler restarts meanwhile, then the
    receiver comes up and its first answer hangs past the timeout (so that delivery is sent
    again): after dedupe by id it has each event exactly once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/down"
    jobs = [notify_stack.submit("--notify-url", url, *_quick_job()) for _ in range(3)]
    for job in jobs:
        notify_stack.wait_state(job, JobState.COMPLETED)

    def all_waiting_after_a_refusal() -> bool:
        shown = _show(notify_stack)
        return "ConnectionRefused" in shown["last_error"] and shown["queued"] >= 3

    eventually(all_waiting_after_a_refusal)
    old = notify_stack.scheduler
    assert old is not None and old.stop() == 0  # the outbox is in Redis: a restart loses nothing
    notify_stack.daemons.remove(old)
    notify_stack.start_scheduler()
    stalls = iter([3.0])  # the first answer comes after the notifier's 2 s timeout
    late = WebhookReceiver(port=port, answer=lambda _p: (200, {}, next(stalls, 0.0))).start()
    try:
        wanted = {f"{job}" for job in jobs}
        eventually(lambda: {str(e["job"]["id"]) for e in late.events()} >= wanted)
        eventually(lambda: _show(notify_stack)["queued"] == 0)
        received = [e for e in late.events() if e["job"]["id"] in jobs]
        ids = {e["id"] for e in received}
        assert len(ids) == 3  # one delivery id per event, whatever was resent
        assert {e["job"]["id"] for e in received} == set(jobs)
        assert len(received) >= len(ids)
    finally:
        late.stop()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--notify-url", "http://169.254.169.254/latest/meta-data/"),  # cloud metadata
        ("--notify-url", "http://[::ffff:169.254.169.254]/"),
        ("--notify-url", "http://10.0.0.1/hook"),  # a private network nobody allowed
        ("--notify-url", "file:///etc/passwd"),
        ("--notify-url", "gopher://127.0.0.1:6379/_FLUSHALL"),
        ("--notify-url", "http://user:pw@127.0.0.1/"),
        ("--notify-url", "http://127.0.0.1/a\r\nX-Injected: 1"),
        ("--mail", "alice@example.org\r\nBcc: eve@example.org"),
        ("--mail", "alice@example.org,eve@example.org"),
        ("--notify-on", "end,reboot"),
    ],
)
def test_hostile_destination_refused_at_submit_with_exit_2(notify_stack: Stack, flag: str, value: str) -> None:
    """(More forms, without a daemon, in tests/unit/test_notify.py.)"""
    before = notify_stack.redis.get(keys.NEXT_JOB_ID)
    extra = ["--mail", "a@example.org"] if flag == "--notify-on" else []
    result = notify_stack.cli("submit", flag, value, *extra, *_quick_job())
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpulab: "), result.stderr
    assert notify_stack.redis.get(keys.NEXT_JOB_ID) == before  # nothing stored, not even an id


def test_user_default_applies_and_redirects_to_other_hosts_are_not_followed(
    notify_stack: Stack, receiver: WebhookReceiver
) -> None:
    other = WebhookReceiver().start()
    try:
        bounce = WebhookReceiver(answer=lambda _p: (307, {"Location": other.url()}, 0.0)).start()
        set_ = notify_stack.cli("notify", "set", "--url", bounce.url(), "--on", "end")
        assert set_.returncode == 0, set_.stderr
        job = notify_stack.submit(*_quick_job())
        notify_stack.wait_state(job, JobState.COMPLETED)
        assert eventually(lambda: bounce.events(job))[0]["event"] == "end"
        eventually(lambda: "redirect" in _show(notify_stack)["last_error"])
        assert other.posts == []  # a 307 elsewhere is a failure, never followed
        bounce.stop()
    finally:
        other.stop()
    refused = notify_stack.cli("notify", "set", "--url", "http://169.254.169.254/")
    assert refused.returncode == 2 and "allow_networks" in refused.stderr
    assert notify_stack.cli("notify", "set", "--clear").returncode == 0
    assert _show(notify_stack)["default"] is None


@pytest.fixture
def own_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A Redis database of its own, so the module's running scheduler does not take the
    events a test raises for a Notifier it drives itself."""
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/7")
    client.flushdb()
    yield client
    client.close()


def _jobs_wanting_idle(client: redis.Redis, url: str, n: int, user: str = "bulk") -> list[int]:
    store = JobStore(client)
    spec = JobSpec(command=("true",), cwd="/", notify_url=url, notify_on=("idle",))
    ids = store.submit_reserved(store.reserve_ids(n), [spec] * n, user=user, uid=1)
    for job_id in ids:
        emit(client, job_id, "idle", "GPU idle for 30 min")
    return ids


def _drive(notifier: Notifier, client: redis.Redis, user: str) -> None:
    while notifier.intake_once(block_ms=1):
        pass

    def drained() -> bool:
        notifier.send_once()
        return not client.hget(keys.NOTIFY_QUEUED, user)

    eventually(drained)


def test_a_receiver_that_fails_forever_is_given_up_after_max_attempts_and_a_4xx_at_once(own_db: redis.Redis) -> None:
    answers = {"/500": 500, "/404": 404}
    failing = WebhookReceiver(answer=lambda p: (answers[p.path], {}, 0.0)).start()
    try:
        _jobs_wanting_idle(own_db, failing.url("/500"), 1, user="u500")
        _jobs_wanting_idle(own_db, failing.url("/404"), 1, user="u404")
        notify = NotifyConfig(allow_networks=("127.0.0.0/8",), max_attempts=3, retry_base_s=0.05, retry_max_s=0.1)
        notifier = Notifier(Config(notify=notify), own_db, consumer="fail-test")
        _drive(notifier, own_db, "u500")
        _drive(notifier, own_db, "u404")
        assert [p.path for p in failing.posts].count("/500") == 3  # max_attempts in all
        assert [p.path for p in failing.posts].count("/404") == 1  # a 4xx is not retried
        stats = {k.decode(): v.decode() for k, v in own_db.hgetall(keys.notify_stats("u500")).items()}
        assert stats["failed"] == "1" and "HTTP 500" in stats["last_error"]
    finally:
        failing.stop()


def test_a_users_queue_is_bounded_and_what_is_dropped_is_counted(own_db: redis.Redis) -> None:
    _jobs_wanting_idle(own_db, "http://127.0.0.1:9/never", 10, user="flood")
    notify = NotifyConfig(allow_networks=("127.0.0.0/8",), max_queued_per_user=4)
    notifier = Notifier(Config(notify=notify), own_db, consumer="cap-test")
    while notifier.intake_once(block_ms=1):
        pass
    assert int(own_db.hget(keys.NOTIFY_QUEUED, "flood") or 0) == 4
    assert int(own_db.hget(keys.notify_stats("flood"), "dropped") or 0) == 6
    assert own_db.xpending(keys.NOTIFY_EVENTS, keys.NOTIFY_GROUP)["pending"] == 0  # all acknowledged


def test_many_events_for_one_user_are_batched_and_each_arrives(own_db: redis.Redis, receiver: WebhookReceiver) -> None:
    """300 events at once (raised through the `emit` hook, as the idle detector does) reach
    the receiver in batches of at most max_batch, each event once."""
    ids = _jobs_wanting_idle(own_db, receiver.url("/bulk"), 300)
    config = Config(notify=NotifyConfig(allow_networks=("127.0.0.0/8",), max_batch=50, max_per_minute=0))
    notifier = Notifier(config, own_db, consumer="bulk-test")
    while notifier.intake_once(block_ms=1):
        pass
    assert int(own_db.hget(keys.NOTIFY_QUEUED, "bulk") or 0) == 300
    _drive(notifier, own_db, "bulk")
    bulk = [p for p in receiver.posts if p.path == "/bulk"]
    assert all(len(p.json["events"]) <= 50 for p in bulk)
    assert math.ceil(300 / 50) <= len(bulk) < 300 / 10  # batched (a resend after a slow answer aside)
    assert sorted(e["job"]["id"] for e in _unique([e for p in bulk for e in p.json["events"]])) == ids


def _unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events deduplicated by delivery id, as a receiver does."""
    return list({e["id"]: e for e in events}.values())


def _show(stack: Stack) -> dict[str, Any]:
    result = stack.cli("notify", "show", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data
