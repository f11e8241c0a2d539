"""Notification rules that need no daemon: event names, URL and address syntax, which
addresses a webhook may reach, signing, backoff, mail headers, which events make deliveries."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs import scripts
from jobs.config import NotifyConfig
from jobs.notify import EVENTS, STATE_EVENTS, NotifyError, check_mail, check_url, parse_events
from jobs.record import JobRecord
from jobs.spec import JobSpec, SpecError, validate_spec
from jobs.states import JobState
from scheduler.notify import mail
from scheduler.notify.guard import Refused, address_allowed, networks, resolve_allowed
from scheduler.notify.notifier import backoff_s, deliveries, mail_text
from scheduler.notify.webhook import signature


def test_events_parse_like_slurm_mail_types() -> None:
    assert parse_events("END,FAIL") == ("end", "fail")
    assert parse_events("fail, end") == ("end", "fail")
    assert parse_events("all") == EVENTS
    assert parse_events("started_late") == ("started-late",)
    for bad in ("", "reboot", "end,,x"):
        with pytest.raises(NotifyError):
            parse_events(bad)


def test_transition_script_raises_the_same_events_as_the_table() -> None:
    table = re.search(r"\(\{(COMPLETED[^}]*)\}\)", scripts.TRANSITION)
    assert table is not None
    in_lua = dict(re.findall(r"(\w+) = '([\w-]+)'", table[1]))
    assert in_lua == STATE_EVENTS


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.org/", "file:///etc/passwd", "http://", "http://user@example.org/",
        "http://a:b@example.org/", "http://example.org/a b", "http://example.org/\r\nHost: x",
        "http://example.org:0/", "http://example.org:99999/", "http://exa\u00e9mple.org/",
        "http://example.org/#frag", "https://" + "a" * 2100 + ".org/",
    ],
)  # fmt: skip
def test_bad_webhook_urls_are_refused(url: str) -> None:
    with pytest.raises(NotifyError):
        check_url(url)


@given(st.text(max_size=300))
def test_url_check_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(NotifyError):
        check_url(text)


@pytest.mark.parametrize(
    "address",
    ["a@b.org\r\nBcc: e@x.org", "a@b.org,e@x.org", "Eve <e@x.org>", "a@b.org\n", "@b.org", "a@", "a b@c.org",
     "a@-b.org"],
)  # fmt: skip
def test_mail_addresses_that_could_add_a_header_or_recipient_are_refused(address: str) -> None:
    with pytest.raises(NotifyError):
        check_mail(address)
    spec = JobSpec(command=("true",), cwd="/", mail=address)
    with pytest.raises(SpecError, match="--mail"):
        validate_spec(spec)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("169.254.169.254", False), ("100.100.100.200", False), ("fd00:ec2::254", False),
        ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("192.168.1.1", False),
        ("172.16.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False), ("fe80::1", False), ("255.255.255.255", False),
    ],
)  # fmt: skip
def test_only_public_addresses_by_default(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), ()) is allowed


def test_admins_may_allow_internal_networks() -> None:
    allow = networks(["10.1.2.0/24", "127.0.0.0/8"])
    assert address_allowed(ipaddress.ip_address("10.1.2.3"), allow)
    assert address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), allow)
    assert not address_allowed(ipaddress.ip_address("10.1.3.3"), allow)
    assert not address_allowed(ipaddress.ip_address("169.254.169.254"), allow)


def test_names_are_resolved_and_every_address_checked() -> None:
    with pytest.raises(Refused, match="localhost"):
        resolve_allowed("http://localhost:8080/hook", ())
    assert resolve_allowed("http://localhost:8080/hook", networks(["127.0.0.0/8", "::1/128"]))
    with pytest.raises(Refused, match="cannot resolve"):
        resolve_allowed("http://no-such-host.invalid/", ())


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"events": []}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature("s3cret", body) == f"sha256={expected}"


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 10, 100) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]


def test_mail_headers_cannot_be_injected_through_job_text() -> None:
    config = NotifyConfig(smtp_host="localhost")
    item = {
        "id": "1-0:mail", "event": "end", "detail": "",
        "job": {"id": 3, "name": "x\r\nBcc: eve@example.org", "state": "COMPLETED", "reason": "", "exit_code": 0,
                "detail": "\x1b[31mred", "node": "n1"},
    }  # fmt: skip
    subject, text = mail_text([item])
    message = mail.build(config, "alice@example.org", subject, text, "1-0:mail")
    assert message["Bcc"] is None and "\r" not in message["Subject"] and "\n" not in message["Subject"]
    assert "\x1b" not in message.get_content()
    with pytest.raises(NotifyError):
        mail.build(config, "alice@example.org\r\nBcc: eve@example.org", subject, text, "1-0:mail")


def _record(**fields: object) -> JobRecord:
    spec = JobSpec(command=("true",), cwd="/", notify_url="https://example.org/h", mail="a@example.org",
                   notify_on=("end", "started-late"))  # fmt: skip
    values: dict[str, object] = {"id": 5, "spec": spec, "state": JobState.RUNNING, "user": "alice", "uid": 1000}
    values.update(fields)
    return JobRecord(**values)  # type: ignore[arg-type]


def test_deliveries_follow_the_jobs_choice_and_the_late_start_threshold() -> None:
    record = _record(submitted_at=1000.0, started_at=1000.0 + 7200)
    made = deliveries("17-0", {"event": "started-late", "at": "9000"}, record, 3600.0)
    assert [(d["id"], d["channel"]) for d in made] == [("17-0:webhook", "webhook"), ("17-0:mail", "mail")]
    early = _record(submitted_at=1000.0, started_at=1010.0)
    assert deliveries("18-0", {"event": "started-late"}, early, 3600.0) == []
    assert deliveries("19-0", {"event": "fail"}, record, 3600.0) == []  # not asked for
    assert deliveries("20-0", {"event": "bogus"}, record, 3600.0) == []


def test_other_users_never_see_a_jobs_webhook_or_address() -> None:
    record = _record()
    public = record.to_json(private=False)["spec"]
    assert public["notify_url"] == "(hidden)" and public["mail"] == "(hidden)"
    assert record.to_json(private=True)["spec"]["notify_url"] == "https://example.org/h"


def test_delivery_to_an_address_that_does_not_resolve_is_retried_one_that_is_internal_is_not() -> None:
    from scheduler.notify.webhook import post

    unresolved = post("http://no-such-host.invalid/", b"{}", {}, (), 1.0)
    internal = post("http://169.254.169.254/", b"{}", {}, (), 1.0)
    assert not unresolved.ok and unresolved.retry
    assert not internal.ok and not internal.retry and "allow_networks" in internal.error
