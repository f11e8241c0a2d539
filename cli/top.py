"""`gpulab top`: a live terminal view (rich.live) of GPUs, running jobs and the queue head.

Memory bars split each GPU into gpulab (█), others (▓) and free (░), so they read the
same with NO_COLOR (which rich honours). Text others wrote goes in as escaped `Text` cells
(cli/render.py `cell`), like everywhere in the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli.render import cell, idle_mark
from jobs.sizes import format_size
from jobs.text import duration, safe
from jobs.text import progress as _progress
from jobs.text import why as _why

BAR_WIDTH = 30
QUEUE_HEAD = 10

Fetch = Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]]


def memory_bar(total: int, gpulab: int, others: int, width: int = BAR_WIDTH) -> Text:
    if total <= 0:
        return Text("?" * width)
    ours = min(width, round(width * gpulab / total))
    theirs = min(width - ours, round(width * others / total))
    bar = Text()
    bar.append("█" * ours, style="green")
    bar.append("▓" * theirs, style="yellow")
    bar.append("░" * (width - ours - theirs), style="dim")
    return bar


NARROW = 120  # below this many columns: short bars, no GPU model names, names cut


def gpu_table(nodes: list[dict[str, Any]], width: int = NARROW) -> Table:
    narrow = width < NARROW
    table = Table(title="GPUs  (█ gpulab  ▓ others  ░ free)", box=None, header_style="bold", pad_edge=False)
    for column in ("NODE", "GPU", "MEMORY", "GPULAB", "OTHERS", "FREE", "AVAIL", "JOBS"):
        table.add_column(column, no_wrap=True, max_width=16 if column == "NODE" and narrow else None)
    for node in nodes:
        if not node["online"]:
            table.add_row(cell(node["name"]), "-", Text("offline", style="red"), "", "", "", "", "")
        for gpu in node["gpus"]:
            total, gpulab = gpu["total_bytes"], max(gpu["gpulab_reserved_bytes"], gpu["gpulab_used_bytes"])
            others = gpu["others_used_bytes"]
            free = max(0, total - gpulab - others)
            label = f"{node['name']}" + ((" (drain)" if narrow else " (draining)") if node.get("draining") else "")
            table.add_row(
                cell(label), cell(str(gpu["index"]) if narrow else f"{gpu['index']} {gpu['name']}"),
                memory_bar(total, gpulab, others, 10 if narrow else BAR_WIDTH),
                format_size(gpulab), format_size(others), format_size(free), format_size(gpu["available_bytes"]),
                str(gpu["jobs"]),
            )  # fmt: skip
    return table


def running_table(jobs: list[dict[str, Any]], now: float, width: int = NARROW) -> Table:
    table = Table(title="Running", box=None, header_style="bold", pad_edge=False)
    cut = width < NARROW
    for column in ("ID", "NAME", "USER", "GPUS", "MEM NOW/PEAK", "TIME", "PROGRESS"):
        limit = {"NAME": 12, "USER": 8, "GPUS": 12}.get(column) if cut else None
        table.add_column(
            column, no_wrap=column != "PROGRESS", max_width=limit, min_width=8 if column == "PROGRESS" else None
        )
    for job in jobs:
        if job["state"] not in ("RUNNING", "ASSIGNED"):
            continue
        placement = safe(f"{job['node']}:" + ",".join(str(g["index"]) for g in job["gpus"]))
        current = sum(job.get("current_bytes", {}).values())
        peak = sum(job.get("peak_bytes", {}).values())
        started = job.get("started_at")
        table.add_row(
            str(job["id"]), cell(job["name"]), cell(job["user"]), Text(placement),
            f"{format_size(current)}/{format_size(peak)}", duration(now - started if started else None),
            cell(" ".join(p for p in (idle_mark(job, now), _progress(job) or job.get("mem_warning", "")) if p)),
        )  # fmt: skip
    return table


def queue_head(jobs: list[dict[str, Any]], now: float, width: int = NARROW) -> Table:
    waiting = [j for j in jobs if j["state"] in ("PENDING", "HELD")]
    waiting.sort(key=lambda j: (-(j.get("priority") or {}).get("total", 0), j["id"]))
    table = Table(title=f"Queue ({len(waiting)} waiting)", box=None, header_style="bold", pad_edge=False)
    cut = width < NARROW
    for column in ("ID", "NAME", "USER", "STATE", "WAIT", "REASON"):
        limit = {"NAME": 14, "USER": 10}.get(column) if cut else None
        table.add_column(column, no_wrap=column != "REASON", max_width=limit)
    for job in waiting[:QUEUE_HEAD]:
        table.add_row(
            str(job["id"]), cell(job["name"]), cell(job["user"]), cell(job["state"]),
            duration(now - job["submitted_at"]), Text(_why(job)),
        )  # fmt: skip
    return table


def frame(gpus: dict[str, Any], jobs: list[dict[str, Any]], now: float | None = None, width: int = NARROW) -> Group:
    """One screen for a terminal `width` columns wide (80 and up: nothing cut that matters)."""
    now = now or time.time()
    header = Text(f"gpulab top  {time.strftime('%H:%M:%S', time.localtime(now))}  (Ctrl-C quits)", style="bold")
    return Group(header, gpu_table(gpus["nodes"], width), running_table(jobs, now, width), queue_head(jobs, now, width))


def run_top(fetch: Fetch, *, once: bool, interval: float) -> None:
    console = Console()
    if once:
        console.print(frame(*fetch(), width=console.width))
        return
    try:
        with Live(frame(*fetch(), width=console.width), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)  # the refresh period of a terminal view, not synchronisation
                live.update(frame(*fetch(), width=console.width), refresh=True)
    except KeyboardInterrupt:
        pass
