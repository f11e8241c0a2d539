"""Admin and operations commands: `gpulab history`, `gpulab top`, `gpulab doctor`.

Added to the CLI's group by cli/main.py.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from datetime import datetime
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from cli.context import Context, pass_ctx
from cli.render import estimate_vs_peak, table_console
from jobs.sizes import format_size
from jobs.spec import SpecError, parse_time_limit
from jobs.text import duration, safe

HISTORY_COLUMNS = (
    "id", "name", "user", "placement", "submitted", "started", "ended", "wall", "peak", "request", "state",
    "reason", "exit_code", "estimate", "mem_origin",
)  # fmt: skip


def parse_since(text: str, now: float | None = None) -> float:
    """`2h`, `1d`, `90m` (ago) or a local date/time `2026-11-27`, `2026-11-27T10:00`: Unix seconds."""
    try:
        return (now or time.time()) - parse_time_limit(text)
    except SpecError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        hint = f"'{text}' is not a time; use e.g. 2h, 1d or 2026-11-27"
        raise click.BadParameter(hint, param_hint="--since") from None


def _stamp(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def history_row(job: dict[str, Any]) -> dict[str, str]:
    """One finished job as flat strings (the table and --csv share it)."""
    # Names, users, nodes and reasons are others' text: escaped (jobs/text.py safe), in the CSV too.
    placement = safe(f"{job['node']}:" + ",".join(str(g["index"]) for g in job["gpus"])) if job["gpus"] else "-"
    started, ended = job.get("started_at"), job.get("ended_at")
    peak = max(job.get("peak_bytes", {}).values(), default=0)
    mem = job["spec"].get("mem_bytes")
    return {
        "id": str(job["id"]),
        "name": safe(job["name"]),
        "user": safe(job["user"]),
        "placement": placement,
        "submitted": _stamp(job.get("submitted_at")),
        "started": _stamp(started),
        "ended": _stamp(ended),
        "wall": duration(ended - started) if started and ended else "-",
        "peak": format_size(peak) if peak else "-",
        "request": "whole" if mem is None else format_size(int(mem)),
        "state": job["state"],
        "reason": safe(job.get("reason") or ""),
        "exit_code": "" if job.get("exit_code") is None else str(job["exit_code"]),
        "estimate": estimate_vs_peak(job),
        "mem_origin": safe(job.get("mem_origin") or ""),
    }


def history_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("ID", "NAME", "USER", "NODE:GPUS", "SUBMITTED", "STARTED", "ENDED", "WALL", "PEAK/REQ", "EST", "STATE")
    for column in columns:
        table.add_column(column, no_wrap=column != "NAME")
    for job in jobs:
        row = history_row(job)
        state = row["state"] + (f" {row['reason']}" if row["reason"] else "")
        if row["exit_code"]:
            state += f" exit {row['exit_code']}"
        table.add_row(
            row["id"], Text(row["name"]), Text(row["user"]), Text(row["placement"]), row["submitted"], row["started"],
            row["ended"], row["wall"], f"{row['peak']}/{row['request']}", row["estimate"] or "-", Text(state),
        )  # fmt: skip
    return table


@click.command()
@click.option("--user", help="Only this user's jobs.")
@click.option("--since", help="Ended at most this long ago (2h, 1d) or since a date (2026-11-27).")
@click.option("--state", help="COMPLETED, FAILED or CANCELLED (comma-separated).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@pass_ctx
def history(
    ctx: Context,
    /,
    user: str | None, since: str | None, state: str | None, limit: int, as_json: bool, as_csv: bool
) -> None:
    """Finished jobs, newest first: times, wall time, peak memory vs request, outcome."""
    query = {"user": user, "since": parse_since(since) if since else None, "state": state, "limit": limit}
    jobs = ctx.call(lambda: ctx.client().history(**query))
    if as_json:
        click.echo(json.dumps({"jobs": jobs}, indent=2, sort_keys=True))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history_row(job) for job in jobs)
    else:
        # Piped output (grep, awk) keeps whole rows rather than rich's 80-column default.
        table_console().print(history_table(jobs))

@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--interval", type=click.FloatRange(0.2, 60), default=1.5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One snapshot as JSON (nodes and live jobs); implies --once.")
@pass_ctx
def top(ctx: Context, /, once: bool, interval: float, as_json: bool) -> None:
    """Live view: GPUs (gpulab / others / free), running jobs, head of the queue. Ctrl-C quits."""
    from cli.top import run_top

    if as_json:
        gpus, jobs = ctx.call(lambda: (ctx.client().gpus(), ctx.client().jobs()))
        click.echo(json.dumps({"nodes": gpus["nodes"], "jobs": jobs}, indent=2, sort_keys=True))
        return
    run_top(lambda: ctx.call(lambda: (ctx.client().gpus(), ctx.client().jobs())), once=once, interval=interval)

@click.command()
@click.option("--json", "as_json", is_flag=True, help="The checks as JSON: {ok, checks: [{level, check, message}]}.")
@pass_ctx
def doctor(ctx: Context, /, as_json: bool) -> None:
    """Check Redis, NVML, the scheduler socket, workers and clocks; exit 1 on any FAIL."""
    from cli.doctor import run_doctor

    sys.exit(run_doctor(ctx.config, as_json))
