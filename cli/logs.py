"""`gpulab logs [-f] [--json] [--raw] ID`: a job's output, from any host.

The output comes from Redis (the job's worker ships it there; see jobs/joblog.py), through
the scheduler's API, by byte offset. `-f` long-polls: the scheduler answers as soon as new
output arrives or the job changes state, so a follower sees a line within about
`[worker] log_ship_interval_s` of the job writing it. While the job waits to start (or is
held), `-f` says once on stderr what it waits for, and again when that changes.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import click

from cli import job_ids
from cli.context import Context, emit_json, pass_ctx
from jobs.sizes import format_size
from jobs.text import safe, terminal_output

FOLLOW_WAIT_S = 10.0  # per long-poll request; the scheduler caps it too
WAITING_STATES = ("PENDING", "HELD", "ASSIGNED")
MAX_HELD_ESCAPE = 32  # an escape sequence split across two answers is held back this long at most


def waiting_line(job_id: int, chunk: dict[str, Any]) -> str:
    """One line saying what a job that has not started waits for."""
    state, reason, detail = chunk.get("state", "?"), chunk.get("reason") or "", chunk.get("detail") or ""
    if state == "ASSIGNED":
        what = "starting on its node"
    elif state == "HELD":
        what = f"held ({safe(reason)}{': ' + safe(detail) if detail else ''}); `gpulab release {job_id}` lets it start"
    else:
        what = f"waiting to start: {safe(reason) or 'not yet considered'}{': ' + safe(detail) if detail else ''}"
    return f"gpulab: job {job_id} is {safe(state)}, {what}"


def skipped_line(skipped: int) -> str:
    return (
        f"\n[gpulab: {format_size(skipped)} of this job's output not kept in Redis (rate or size cap); "
        "the whole log is on its node, see `gpulab show`]\n"
    )


class TerminalWriter:
    """Writes a job's output to stdout: escaped for a terminal (holding back an escape
    sequence cut in two by the chunking, so it is not shown as garbage), or, with `exact`,
    the bytes as the job wrote them (answers in base64: not UTF-8 is kept too)."""

    def __init__(self, clean: bool, exact: bool = False) -> None:
        self.clean = clean
        self.exact = exact
        self.held = ""

    def write_answer(self, data: str, *, last: bool = False) -> None:
        if self.exact:
            sys.stdout.buffer.write(base64.b64decode(data))
            sys.stdout.buffer.flush()
        else:
            self.write(data, last=last)

    def note(self, text: str) -> None:
        """gpulab's own words: not mixed into output meant to be the job's bytes."""
        if self.exact:
            click.echo(text.strip("\n"), err=True)
        else:
            self.write(text)

    def write(self, text: str, *, last: bool = False) -> None:
        if self.clean:
            text = self.held + text
            self.held = ""
            cut = text.rfind("\x1b")
            if not last and cut >= 0 and len(text) - cut <= MAX_HELD_ESCAPE and _unfinished_csi(text[cut:]):
                text, self.held = text[:cut], text[cut:]
            text = terminal_output(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def _unfinished_csi(text: str) -> bool:
    return text == "\x1b" or (text.startswith("\x1b[") and all(c in "0123456789;" for c in text[2:]))


@click.command()
@click.argument("job_id", type=job_ids.JOB_ID)
@click.option("-f", "--follow", is_flag=True, help="Follow until the job ends; says what a waiting job waits for.")
@click.option("--json", "as_json", is_flag=True, help="JSON: one object; with -f one object per line.")
@click.option("--raw", is_flag=True, help="Print the bytes as written (escape sequences too), even to a terminal.")
@pass_ctx
def logs(ctx: Context, job_id: int, follow: bool, as_json: bool, raw: bool) -> None:
    """Print a job's output (stdout and stderr), from any host. To a terminal, escape sequences
    are shown escaped; piped, or with --raw, the bytes are exactly what the job wrote."""
    client, offset = ctx.client(), 0
    terminal = sys.stdout.isatty()
    exact = not as_json and (raw or not terminal)
    writer = TerminalWriter(clean=terminal and not raw and not as_json, exact=exact)
    said = None  # the (state, reason) last reported
    parts: list[str] = []
    skipped = 0
    chunk: dict[str, Any] = {}
    final_reads = 0
    while True:
        # The first answer at once (it says what a waiting job waits for), then long polls.
        chunk = ctx.call(client.log, job_id, offset, FOLLOW_WAIT_S if follow and chunk else 0.0, exact)
        offset = chunk["offset"]
        skipped += chunk.get("skipped", 0)
        status = (chunk.get("state"), chunk.get("reason"))
        if as_json and follow and (chunk["data"] or chunk.get("skipped") or status != said):
            print(json.dumps(_json_chunk(job_id, chunk)), flush=True)
        elif as_json:
            parts.append(chunk["data"])
        else:
            if chunk.get("skipped"):
                writer.note(skipped_line(chunk["skipped"]))
            writer.write_answer(chunk["data"], last=chunk["final"] and not chunk["more"])
            waiting = chunk.get("state") in WAITING_STATES
            if waiting and status != said and (follow or (offset == 0 and not chunk["data"])):
                click.echo(waiting_line(job_id, chunk), err=True)
        said = status
        if chunk["more"]:
            continue
        if chunk["final"] or not follow:
            # Following, a job that just ended may have had its last bytes land after that read.
            if follow and chunk["final"] and final_reads == 0:
                final_reads += 1
                continue
            break
    if as_json and not follow:
        emit_json({**_json_chunk(job_id, chunk), "data": "".join(parts), "skipped": skipped, "offset": 0})


def _json_chunk(job_id: int, chunk: dict[str, Any]) -> dict[str, Any]:
    keys = ("data", "skipped", "end", "state", "reason", "detail", "final", "source")
    return {"id": job_id, "offset": chunk.get("start", 0), **{k: chunk.get(k) for k in keys}}
