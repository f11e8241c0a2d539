"""`gpulab queue` / `gpulab q`: filters applied by the scheduler (`-u`, `--me`, `-t`,
`--name`), pending jobs in the order they will be considered, and `--all` paging through
every finished job (or `--limit` of them) instead of stopping at a fixed count."""

from __future__ import annotations

from typing import Any

import click

from cli import render
from cli.context import Context, emit_json, pass_ctx

PAGE = 1000


def _split(values: tuple[str, ...]) -> str:
    """Repeatable and comma-separated (`-t PENDING -t HELD` = `-t PENDING,HELD`)."""
    return ",".join(v.strip() for value in values for v in value.split(",") if v.strip())


@click.command(name="queue")
@click.option("--all", "all_jobs", is_flag=True, help="Include finished jobs (newest first, every page).")
@click.option("-u", "--user", "users", multiple=True, metavar="USER", help="Only these users' jobs (repeatable, a,b).")
@click.option("--me", is_flag=True, help="Only my jobs.")
@click.option(
    "-t", "--state", "states", multiple=True, metavar="STATE", help="Only jobs in these states (PENDING,HELD)."
)
@click.option("--name", "pattern", metavar="PATTERN", help="Only jobs whose name matches (shell glob: 'sweep*').")
@click.option("--limit", type=click.IntRange(1), help="With --all: at most this many finished jobs.")
@click.option("--cursor", type=click.IntRange(0), help="With --all: one page from here (--json gives next_cursor).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def queue_cmd(
    ctx: Context, /, all_jobs: bool, users: tuple[str, ...], me: bool, states: tuple[str, ...], pattern: str | None,
    limit: int | None, cursor: int | None, as_json: bool,
) -> None:  # fmt: skip
    """Jobs: running, then pending in the order they will be considered (PRIORITY =
    --priority + fair share + age), then held; their GPUs, memory, age and why they wait."""
    client = ctx.client()
    query: dict[str, Any] = {"user": _split(users), "me": "1" if me else "", "state": _split(states), "name": pattern}
    if all_jobs or cursor is not None or limit is not None:
        query["all"] = "1"
    jobs: list[dict[str, Any]] = []
    seen: set[int] = set()
    at, left = cursor or 0, limit
    while True:
        page_size = PAGE if left is None else min(PAGE, left)
        page = ctx.call(client.jobs_page, {**query, "limit": page_size, "cursor": at})
        new = [j for j in page["jobs"] if j["id"] not in seen]  # a job that finished meanwhile comes once
        seen.update(j["id"] for j in new)
        jobs += new
        at = page.get("next_cursor")
        if left is not None:
            left -= page_size
        if cursor is not None or at is None or (left is not None and left <= 0):
            break
    if as_json:
        emit_json({"jobs": jobs, "next_cursor": page.get("next_cursor") if cursor is not None else None})
    else:
        render.table_console().print(render.queue_table(jobs))
