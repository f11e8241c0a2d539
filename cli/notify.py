"""Notification options of `submit`/`train` (--notify-url, --mail, --notify-on) and
`gpulab notify set|show|secret`: a user's default for jobs submitted without their own."""

from __future__ import annotations

import sys
from typing import Any

import click

from cli.context import EXIT_USAGE, Context, emit_json, fail, pass_ctx
from jobs.api import API_PREFIX
from jobs.notify import EVENTS, NotifyError, parse_events
from jobs.spec import SpecError
from jobs.text import safe

EVENT_HELP = ", ".join(EVENTS) + " or all"


def notify_options(fn: Any) -> Any:
    """Add the per-job notification options to a submitting command."""
    options = [
        click.option("--notify-url", metavar="URL", help="POST a signed JSON event here (http/https)."),
        click.option("--mail", metavar="ADDR", help="Mail this address (needs [notify] smtp_host)."),
        click.option("--notify-on", metavar="EVENTS", help=f"When to notify: {EVENT_HELP} (default: end,fail,held)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def notify_fields(options: dict[str, Any]) -> dict[str, Any]:
    """JobSpec keyword arguments from the notification options (raises SpecError on bad input)."""
    events: tuple[str, ...] = ()
    if options.get("notify_on"):
        try:
            events = parse_events(options["notify_on"])
        except NotifyError as exc:
            raise SpecError("--notify-on", str(exc)) from None
    return {"notify_url": options.get("notify_url") or "", "mail": options.get("mail") or "", "notify_on": events}


def print_new_secret(answer: dict[str, Any]) -> None:
    """A webhook secret made by this call is shown once, on stderr (stdout stays the job id)."""
    secret = answer.get("notify_secret") or answer.get("secret")
    if secret:
        click.echo(
            f"gpulab: your webhook signing secret (shown once; `gpulab notify secret --rotate` makes a new one): "
            f"{safe(secret, 300)}",
            err=True,
        )


@click.group(name="notify")
def notify_group() -> None:
    """Your default notifications: where (webhook, mail) and when (events)."""


@notify_group.command(name="set")
@click.option("--url", metavar="URL", help="Webhook for a signed JSON POST (http/https).")
@click.option("--mail", metavar="ADDR", help="Mail address.")
@click.option("--on", "events", metavar="EVENTS", default="end,fail,held", show_default=True, help=EVENT_HELP)
@click.option("--clear", is_flag=True, help="Remove your default.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def set_cmd(ctx: Context, /, url: str | None, mail: str | None, events: str, clear: bool, as_json: bool) -> None:
    """Default for your jobs submitted from now on without --notify-url/--mail."""
    if clear:
        body: dict[str, Any] = {"clear": True}
    else:
        if not url and not mail:
            fail("notify set: give --url and/or --mail (or --clear)", EXIT_USAGE)
        try:
            body = {"url": url or "", "mail": mail or "", "events": list(parse_events(events))}
        except NotifyError as exc:
            fail(f"--on: {exc}", EXIT_USAGE)
    answer = ctx.call(lambda: ctx.client().request("POST", f"{API_PREFIX}/notify", body))
    print_new_secret(answer)
    if as_json:
        emit_json({k: v for k, v in answer.items() if k != "secret"})
    else:
        _print(answer)


@notify_group.command(name="show")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show_cmd(ctx: Context, /, as_json: bool) -> None:
    """Your default, whether a secret is set, and your deliveries: queued, sent, failed, dropped."""
    answer = ctx.call(lambda: ctx.client().request("GET", f"{API_PREFIX}/notify"))
    if as_json:
        emit_json(answer)
    else:
        _print(answer)


@notify_group.command(name="secret")
@click.option("--rotate", is_flag=True, help="Make a new random secret (the old one stops working).")
@click.option("--set-from", "from_file", type=click.File("r"), metavar="FILE", help="Secret from FILE (-: stdin).")
@pass_ctx
def secret_cmd(ctx: Context, /, rotate: bool, from_file: Any) -> None:
    """Your webhook signing secret: made and shown once, rotated, or set from a file."""
    body: dict[str, Any] = {"rotate": rotate}
    if from_file is not None:
        body = {"secret": from_file.read(4096).strip()}
    answer = ctx.call(lambda: ctx.client().request("POST", f"{API_PREFIX}/notify/secret", body))
    if answer.get("secret"):
        sys.stdout.write(answer["secret"] + "\n")
    else:
        click.echo("secret set")


def _print(answer: dict[str, Any]) -> None:
    default = answer.get("default")
    if default:
        click.echo(f"url:    {safe(default['url']) or '-'}")
        click.echo(f"mail:   {safe(default['mail']) or '-'}")
        click.echo(f"on:     {','.join(default['events'])}")
    else:
        click.echo("no default (jobs notify only with --notify-url/--mail)")
    click.echo(f"secret: {'set' if answer.get('secret_set') else 'none yet'}")
    click.echo(
        f"deliveries: {answer['queued']} queued, {answer['sent']} sent, {answer['failed']} failed, "
        f"{answer['dropped']} dropped"
    )
    if answer.get("last_error"):
        click.echo(f"last error: {safe(answer['last_error'], 300)}")
