"""Job ids on the command line: ranges (`12-40`), lists (`12,15`), shell completion, and the
bulk `cancel` / `hold` / `release` commands that send them all in one API call."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from cli.client import ApiClient
from cli.context import EXIT_USAGE, Context, emit_json, fail, pass_ctx
from jobs.api import MAX_BULK_IDS

COMPLETION_TIMEOUT_S = 0.5  # a Tab press must never hang the shell
USAGE_STATUSES = (400, 404, 409, 413, 429)  # the caller's mistake: exit 2, like single-job errors


def complete_job_ids(incomplete: str) -> list[CompletionItem]:
    """Ids of the caller's waiting and running jobs (newest first), from the API; nothing,
    silently, when the scheduler is not reachable or slow."""
    try:
        from jobs.config import load_config

        socket_path = load_config().socket_path
        if not Path(socket_path).exists():
            return []
        jobs = ApiClient(socket_path, timeout_s=COMPLETION_TIMEOUT_S).jobs()
    except Exception:  # completion runs inside the user's shell: never a traceback there
        return []
    me = os.getuid()
    ours = [j for j in jobs if j.get("uid") == me] or jobs
    items = []
    for job in sorted(ours, key=lambda j: -int(j["id"])):
        text = str(job["id"])
        if text.startswith(incomplete):
            items.append(CompletionItem(text, help=f"{job.get('state', '')} {job.get('name', '')}".strip()))
    return items


class _CompletesJobIds(click.ParamType[Any, Any]):
    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        return complete_job_ids(incomplete)


class JobIdType(_CompletesJobIds):
    """One job id (an integer), completed from the scheduler's queue."""

    name = "JOB_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            job_id = int(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a job id", param, ctx)
        if job_id < 1:
            self.fail(f"'{value}' is not a job id", param, ctx)
        return job_id


class JobIdsType(_CompletesJobIds):
    """Job ids: `12`, a range `12-40`, or a comma list `12,15,20-25`; converts to a tuple."""

    name = "JOB_IDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        ids: list[int] = []
        for item in str(value).split(","):
            first, dash, last = item.strip().partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                self.fail(f"'{value}' is not a job id, a range (12-40) or a list (12,15)", param, ctx)
            low, high = int(first), int(last) if dash else int(first)
            if low < 1 or high < low:
                self.fail(f"'{item}': ids start at 1 and ranges go up (12-40)", param, ctx)
            if high - low + 1 + len(ids) > MAX_BULK_IDS:
                self.fail(f"'{value}' names more than {MAX_BULK_IDS} jobs", param, ctx)
            ids += range(low, high + 1)
        return tuple(ids)


JOB_ID = JobIdType()
JOB_IDS = JobIdsType()

_HELP = {
    "cancel": "Cancel jobs (running ones are stopped, their whole process tree).",
    "hold": "Keep pending jobs from starting.",
    "release": "Let held jobs start again.",
}


def _bulk_command(verb: str) -> click.Command:
    @click.command(name=verb, help=_HELP[verb] + " JOB_IDS: 12, 12-40, 12,15; all in one request.")
    @click.argument("job_ids", type=JOB_IDS, nargs=-1)
    @click.option("--array", "arrays", type=JOB_ID, multiple=True, help="Every task of array ID (repeatable).")
    @click.option("--json", "as_json", is_flag=True)
    @pass_ctx
    def command(ctx: Context, /, job_ids: tuple[tuple[int, ...], ...], arrays: tuple[int, ...], as_json: bool) -> None:
        ids = list(dict.fromkeys(i for group in job_ids for i in group))
        if not ids and not arrays:
            fail(f"{verb}: name at least one job id (12, 12-40, 12,15) or --array ID", EXIT_USAGE)
        if len(ids) > MAX_BULK_IDS:
            fail(f"{verb}: more than {MAX_BULK_IDS} job ids at once", EXIT_USAGE)
        results = ctx.call(ctx.client().bulk_action, verb, ids, list(dict.fromkeys(arrays)))
        sys.exit(report(verb, results, as_json))

    return command


def report(verb: str, results: list[dict[str, Any]], as_json: bool) -> int:
    """Print each job's result (errors on stderr); the exit code: 0 if every job was done,
    2 if the refusals were all the caller's mistakes (no such job, wrong state), else 1."""
    errors = [r for r in results if "error" in r]
    if as_json:
        emit_json(results)
    else:
        for r in results:
            if "error" in r:
                click.echo(f"gpulab: {r['error']}", err=True)
            else:
                click.echo(f"{r['id']} {r['state']}" + (f" ({r['note']})" if r.get("note") else ""))
    if not errors:
        return 0
    return EXIT_USAGE if all(r.get("status") in USAGE_STATUSES for r in errors) else 1


cancel, hold, release = (_bulk_command(verb) for verb in ("cancel", "hold", "release"))
