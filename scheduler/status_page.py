"""The read-only status page at GET / on the metrics port: server-rendered HTML, no JS.

Every string someone else wrote (job names, users, nodes, reasons, progress) goes through
`_h`: jobs.text.safe (one line, control characters escaped, cut) then html.escape. The page
is everyone's view: records are shown as `to_json(private=False)` gives them (no command,
directory, environment, log path, or status beyond numeric progress).
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from jobs.sizes import format_size
from jobs.text import duration, safe
from jobs.text import progress as _progress
from jobs.text import why as _why
from scheduler.service import Caller, SchedulerService

READER = Caller(uid=-2, user="status-page", pid=0)
RECENT_FAILURES = 10

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { text-align: left; padding: 2px 10px; border-bottom: 1px solid #ddd; }
.bar { display: flex; width: 240px; height: 14px; border: 1px solid #999; }
.gpulab { background: #2a9d4b; } .others { background: #e0a030; } .free { background: #eee; }
.muted { color: #777; }
"""


def _h(value: object) -> str:
    return escape(safe(value))


def _table(headers: tuple[str, ...], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bar(total: int, gpulab: int, others: int) -> str:
    if total <= 0:
        return ""
    parts = [("gpulab", gpulab), ("others", others), ("free", max(0, total - gpulab - others))]
    spans = "".join(f'<span class="{c}" style="width:{100 * v / total:.1f}%"></span>' for c, v in parts if v > 0)
    title = escape(f"gpulab {format_size(gpulab)} / others {format_size(others)} / total {format_size(total)}")
    return f'<div class="bar" title="{title}">{spans}</div>'


def gpu_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for node in nodes:
        if not node["online"]:
            rows.append([_h(node["name"]), "-", "offline", "", "", ""])
        for gpu in node["gpus"]:
            gpulab = max(gpu["gpulab_reserved_bytes"], gpu["gpulab_used_bytes"])
            state = "draining" if node.get("draining") else ("ok" if gpu["healthy"] else f"unhealthy: {gpu['error']}")
            rows.append(
                [
                    _h(node["name"]),
                    _h(f"{gpu['index']} {gpu['name']}"),
                    _bar(gpu["total_bytes"], gpulab, gpu["others_used_bytes"]),
                    escape(f"{format_size(gpulab)} / {format_size(gpu['others_used_bytes'])}"),
                    escape(format_size(gpu["available_bytes"])),
                    _h(state),
                ]
            )
    return rows


def request(job: dict[str, Any]) -> str:
    """What the job asked for: `2 x 12.0GiB` (GPUs x memory per GPU), or whole GPUs."""
    spec = job["spec"]
    mem = spec.get("mem_bytes")
    return f"{spec.get('gpus', 1)} x " + ("whole GPU" if mem is None else format_size(int(mem)))


def priority(job: dict[str, Any]) -> str:
    """Like `gpulab queue`: the total, then --priority + fair share + age."""
    parts = job.get("priority")
    if not isinstance(parts, dict):
        return ""
    try:
        return f"{parts['total']:.0f} = {parts['priority']:.0f} + {parts['fairshare']:.0f} + {parts['age']:.0f}"
    except (KeyError, TypeError, ValueError):
        return ""


def _job_cells(job: dict[str, Any], *extra: str) -> list[str]:
    return [_h(job["id"]), _h(job["name"]), _h(job["user"]), *(_h(e) for e in extra)]


def render_page(svc: SchedulerService, refresh_s: int = 2) -> str:
    now = time.time()
    nodes = svc.gpus(READER)["nodes"]
    jobs = svc.list_jobs(READER, all_jobs=False)["jobs"]
    running = [
        _job_cells(
            j,
            j["state"],
            f"{j['node']}:" + ",".join(str(g["index"]) for g in j["gpus"]),  # escaped in _job_cells
            request(j),
            format_size(sum(j.get("current_bytes", {}).values())),
            duration(now - j["started_at"] if j.get("started_at") else None),
            _progress(j) or j.get("mem_warning", ""),
        )
        for j in jobs
        if j["state"] in ("ASSIGNED", "RUNNING")
    ]
    queue = [
        _job_cells(j, j["state"], request(j), priority(j), duration(now - j["submitted_at"]), _why(j))
        for j in jobs
        if j["state"] in ("PENDING", "HELD")
    ]
    finished = sorted(svc.store.finished(limit=200), key=lambda r: -(r.ended_at or 0))
    recent = [r.to_json(private=False) for r in finished[:RECENT_FAILURES]]
    failures = [r.to_json(private=False) for r in finished if r.state.value == "FAILED"][:RECENT_FAILURES]
    ended = [
        _job_cells(j, j["state"], time.strftime("%H:%M:%S", time.localtime(j["ended_at"] or 0)), _why(j))
        for j in recent
    ]
    failed = [
        _job_cells(j, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["ended_at"] or 0)), _why(j)) for j in failures
    ]
    stamp = escape(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))
    gpu_headers = ("Node", "GPU", "Memory (gpulab / others / free)", "gpulab / others", "Available", "State")
    running_headers = ("ID", "Name", "User", "State", "GPUs", "Request", "Memory now", "Time", "Progress")
    # Pending jobs in the order the scheduler considers them (scheduler/job_listing.py).
    queue_headers = (
        "ID",
        "Name",
        "User",
        "State",
        "Request",
        "Priority = prio + fair share + age",
        "Waiting",
        "Reason",
    )
    sections = [
        ("GPUs", _table(gpu_headers, gpu_rows(nodes), "No worker is heartbeating.")),
        ("Running", _table(running_headers, running, "None.")),
        ("Queue", _table(queue_headers, queue, "The queue is empty.")),
        ("Recently finished", _table(("ID", "Name", "User", "State", "Ended", "Reason"), ended, "None yet.")),
        ("Recent failures", _table(("ID", "Name", "User", "Ended", "Reason"), failed, "None.")),
    ]
    body = "\n".join(f"<h2>{title}</h2>{html}" for title, html in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{int(refresh_s)}">
<title>gpulab status</title><style>{STYLE}</style></head><body>
<h1>gpulab</h1><p class="muted">{stamp} &middot; refreshes every {int(refresh_s)} s &middot;
<a href="/metrics">metrics</a></p>
{body}
</body></html>
"""
