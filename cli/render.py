"""Human output of the read commands: tables and durations. `--json` bypasses all of this.

Most of what is shown was written by someone other than the reader (names, commands and
directories by a job's owner, progress by the job itself, details by the daemons): every such
string goes through `jobs.text.safe` (no control character or escape sequence reaches the
terminal, one line each) and into tables as `Text` (never read as rich markup, which could
style it or emit a hyperlink escape), and a wrong type in a job's status never raises.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from jobs.arrays import format_indexes, parse_array
from jobs.sizes import format_size
from jobs.text import MAX_FIELD_CHARS, duration, number, safe
from jobs.text import progress as _progress
from jobs.text import why as _why

LONG_FIELD_CHARS = 4096  # a command or directory in `show`: the reader wants all of it


def cell(value: object, limit: int = MAX_FIELD_CHARS) -> Text:
    """A table cell of text someone else wrote: escaped, cut, and never read as markup."""
    return Text(safe(value, limit))


def _mem(job: dict[str, Any]) -> str:
    mem = job["spec"].get("mem_bytes")
    return "whole" if mem is None else format_size(int(mem))


def _gpus(job: dict[str, Any]) -> str:
    if job["gpus"]:
        return safe(f"{job['node']}:" + ",".join(str(g["index"]) for g in job["gpus"]))
    return str(job["spec"]["gpus"])


def _priority(job: dict[str, Any]) -> str:
    """Like sprio: the total, then its parts (--priority + fair share + age)."""
    parts = job.get("priority")
    if not parts:
        return ""
    return f"{parts['total']:.0f} = {parts['priority']:.0f}+{parts['fairshare']:.0f}+{parts['age']:.0f}"


def _estimate(job: dict[str, Any], now: float) -> str:
    est = job.get("est_start_at")
    if job["state"] != "PENDING" or not est:
        return ""
    at = time.strftime("%H:%M:%S" if est - now < 86400 else "%Y-%m-%d %H:%M", time.localtime(est))
    return f"; est. start {at} (in {duration(max(0.0, est - now))})"


def start_column(job: dict[str, Any], now: float) -> str:
    """START: a waiting job's expected start ("in 12:30" or "now"), "never" for a job no
    GPU can hold, "-" when unknown; empty for jobs that are not waiting."""
    if job["state"] != "PENDING":
        return ""
    if job.get("reason") == "Infeasible":
        return "never"
    est = number(job.get("est_start_at"))
    if est is None:
        return "-"
    return "now" if est - now < 1 else f"in {duration(est - now)}"


def idle_mark(job: dict[str, Any], now: float) -> str:
    """"IDLE 35:00" for a running job flagged idle (GPU memory held at ~0% utilisation), else ""."""
    since = number(job.get("idle_since"))
    if job["state"] != "RUNNING" or since is None:
        return ""
    return f"IDLE {duration(max(0.0, now - since))}"


def _rows(jobs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(ID, NAME, job) per row. Pending tasks of one array waiting for the same reason share
    a row, like squeue: ids 13-43, name sweep[1-31%4]."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    order: list[list[dict[str, Any]]] = []
    for job in jobs:
        if job["state"] == "PENDING" and job.get("array_id") is not None:
            key = (job["array_id"], job.get("reason"), job.get("detail"))
            if key in groups:
                groups[key].append(job)
                continue
            groups[key] = [job]
            order.append(groups[key])
        else:
            order.append([job])
    rows = []
    for group in order:
        job = group[0]
        if job.get("array_id") is None:
            rows.append((str(job["id"]), safe(job["name"]), job))
            continue
        array = job["spec"].get("array") or ""
        throttle = parse_array(array).throttle if array else 0
        indexes = format_indexes([j["array_index"] for j in group])
        if len(group) > 1 and throttle:
            indexes += f"%{throttle}"
        ids = str(job["id"]) if len(group) == 1 else f"{group[0]['id']}-{group[-1]['id']}"
        rows.append((ids, f"{safe(job['name'])}[{indexes}]", job))
    return rows


def queue_table(jobs: list[dict[str, Any]], now: float | None = None) -> Table:
    now = now or time.time()
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = (
        "ID", "NAME", "USER", "STATE", "GPUS", "MEM/GPU", "PEAK", "AGE", "TIME", "START", "PRIORITY=PRIO+FAIR+AGE",
        "REASON / PROGRESS",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, no_wrap=column not in ("REASON / PROGRESS", "NAME"))
    for ids, name, job in _rows(jobs):
        started, ended = job.get("started_at"), job.get("ended_at")
        run_time = (ended or now) - started if started else None
        peak = sum(job.get("peak_bytes", {}).values())
        extra = _progress(job) or _why(job)
        if job["state"] in ("RUNNING",) and _progress(job) and job.get("mem_warning"):
            extra += f"; {safe(job['mem_warning'])}"
        if idle_mark(job, now):
            extra = idle_mark(job, now) + (f"; {extra}" if extra else "")
        table.add_row(
            ids,
            Text(name),
            cell(job["user"]),
            cell(job["state"]),
            Text(_gpus(job)),
            _mem(job),
            format_size(peak) if peak else "-",
            duration(now - job["submitted_at"]),
            duration(run_time),
            start_column(job, now),
            _priority(job),
            Text(extra),
        )
    return table


def gpus_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NODE", "GPU", "NAME", "TOTAL", "USED", "GPULAB RESERVED", "OTHERS", "AVAILABLE", "JOBS", "STATE"):
        table.add_column(column, no_wrap=True)
    for node in nodes:
        if not node["online"]:
            table.add_row(cell(node["name"]), "-", "-", "-", "-", "-", "-", "-", "-", "offline")
            continue
        for gpu in node["gpus"]:
            state = "ok" if gpu["healthy"] else f"unhealthy: {gpu['error']}"
            if node.get("draining"):
                state = "draining" + (f" ({node['drain_reason']})" if node.get("drain_reason") else "")
            table.add_row(
                cell(node["name"]),
                str(gpu["index"]),
                cell(gpu["name"]),
                format_size(gpu["total_bytes"]),
                format_size(gpu["used_bytes"]),
                format_size(gpu["gpulab_reserved_bytes"]),
                format_size(gpu["others_used_bytes"]),
                format_size(gpu["available_bytes"]),
                str(gpu["jobs"]),
                cell(state),
            )
    return table


def _metrics(status: dict[str, Any]) -> str:
    """The job's own metrics (`show`, its owner only): whatever it wrote, as text."""
    metrics = status.get("metrics")
    if not isinstance(metrics, dict):
        return ""
    parts = []
    for key, value in metrics.items():
        if str(key).endswith("_at"):  # timestamps are for tools (--json), not for reading
            continue
        n = number(value)
        parts.append(f"{key}={n:.4g}" if isinstance(value, float) and n is not None else f"{key}={value}")
    return ", ".join(parts)


def _policy_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    """Constraints, dependencies, array membership and the expected start, where they apply."""
    spec, rows = job["spec"], []
    wants = [f"node {spec['node']}"] if spec.get("node") else []
    wants += [f"GPU model '{spec['gpu_model']}'"] if spec.get("gpu_model") else []
    wants += ["exclusive GPUs"] if spec.get("exclusive") else []
    if wants:
        rows.append(("Constraints", ", ".join(wants)))
    deps = [f"after {d}" for d in spec.get("after_ok") or []] + [f"after-any {d}" for d in spec.get("after_any") or []]
    if deps:
        rows.append(("Depends on", ", ".join(deps)))
    if job.get("array_id") is not None:
        rows.append(("Array", f"{job['array_id']} ({spec.get('array')}), task {job.get('array_index')}"))
    idle = idle_mark(job, time.time())
    if idle:
        rows.append(("Idle", idle.replace("IDLE ", "for ") + " (GPU memory held, ~0% utilisation)"))
    estimate = _estimate(job, time.time()).removeprefix("; ")
    if job["state"] == "PENDING":
        never = job.get("reason") == "Infeasible"
        rows.append(("Expected", "never: no GPU can hold it" if never else estimate or "start unknown"))
    return rows


def estimate_vs_peak(job: dict[str, Any]) -> str:
    """`1.1 GiB, peak 1.2 GiB (-8%)`: the pre-run estimate against the measured peak."""
    estimate = job["spec"].get("mem_estimate")
    if not isinstance(estimate, int) or isinstance(estimate, bool):
        return ""
    peak = max(job.get("peak_bytes", {}).values(), default=0)
    if not peak:
        return format_size(estimate)
    return f"{format_size(estimate)}, peak {format_size(peak)} ({(estimate - peak) / peak * 100:+.0f}%)"


def memory_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the request came from (a learned profile, an estimate) and the estimate's error."""
    rows = []
    if job.get("mem_origin"):
        rows.append(("Mem from", str(job["mem_origin"])))
    if job.get("profile_label"):
        rows.append(("Profile", str(job["profile_label"])))
    if estimate_vs_peak(job):
        rows.append(("Estimate", estimate_vs_peak(job)))
    if job.get("mem_warning"):
        rows.append(("Mem warning", str(job["mem_warning"])))
    return rows


def show_job(console: Console, job: dict[str, Any]) -> None:
    spec = job["spec"]
    rows = [
        ("Job", f"{job['id']} ({job['name']})"),
        ("State", job["state"] + (f" ({_why(job)})" if _why(job) else "")),
        ("User", f"{job['user']} (uid {job['uid']})"),
        ("Command", safe(" ".join(safe(a, LONG_FIELD_CHARS) for a in spec["command"]), LONG_FIELD_CHARS)),
        ("Directory", safe(spec["cwd"], LONG_FIELD_CHARS)),
        (
            "Request",
            f"{spec['gpus']} GPU(s) x {_mem(job)}"
            + (f", time limit {duration(spec['time_limit_s'])}" if spec.get("time_limit_s") else ""),
        ),
        *memory_rows(job),
        *_policy_rows(job),
        ("Placed", _gpus(job) if job["gpus"] else "-"),
        ("Attempt", str(job["attempt"])),
        ("Exit code", "-" if job.get("exit_code") is None else str(job["exit_code"])),
        ("Peak memory", ", ".join(f"{format_size(v)} on {k}" for k, v in job.get("peak_bytes", {}).items()) or "-"),
        ("Log", safe(job.get("log_path") or "-", LONG_FIELD_CHARS)),
    ]
    status = job.get("status")
    if isinstance(status, dict) and status.get("kind") == "training":
        rows.append(("Progress", _progress(job)))
        if _metrics(status):
            rows.append(("Metrics", _metrics(status)))
        if isinstance(status.get("checkpoint"), str):
            step = number(status.get("checkpoint_step"))
            node = status.get("checkpoint_node") or job.get("node") or "?"
            at = f"{node}:{status['checkpoint']}" + (f" (step {int(step)})" if step is not None else "")
            rows.append(("Checkpoint", at))
    for label, value in rows:
        # The label is ours; the value is escaped twice: safe() for the terminal, escape() for rich.
        text = value if label in ("Command", "Directory", "Log") else safe(value, LONG_FIELD_CHARS)
        console.print(f"[bold]{label:>12}[/bold]  {escape(text)}", highlight=False, markup=True)
    if job.get("history"):
        console.print("[bold]     History[/bold]")
        for event in job["history"]:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_seconds(event.get("at"))))
            text = " ".join(safe(p) for p in (event.get("state"), event.get("reason"), event.get("detail")) if p)
            console.print(f"              {at}  {text}", highlight=False, markup=False)


def _seconds(value: Any) -> float:
    """A stored timestamp (text in Redis); 0 when it is not one."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 0.0
    return seconds if 0 <= seconds < 2**40 else 0.0


def table_console() -> Console:
    """A console for tables. Piped into a file or `grep`, rows are not cut at 80 columns."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=250 if wide else None)
