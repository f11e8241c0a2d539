"""`--mem auto`, the pre-run estimate of `gpulab train`, and `gpulab profile`.

The CLI never imports torch: the estimate runs in a child process (`python -P -m
worker.training.estimate`), as the submitting user, in their directory, with their
environment, before anything is stored. Its figure is untrusted input like `--mem` itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from cli.context import EXIT_USAGE, Context, emit_json, fail, pass_ctx
from cli.render import table_console
from jobs.sizes import format_size
from jobs.spec import JobSpec, SpecError, parse_mem
from jobs.text import safe

AUTO = "auto"


def parse_mem_option(mem: str | None) -> tuple[int | None, bool]:
    """`--mem`: (bytes, False), or (None, True) for `auto`, or (None, False) when absent."""
    if mem is None:
        return None, False
    if mem.strip().lower() == AUTO:
        return None, True
    try:
        return parse_mem(mem), False
    except SpecError as exc:
        fail(f"{exc}; or 'auto' to use what this job needed before", EXIT_USAGE)


def announce(answer: dict[str, Any]) -> None:
    """Where a request gpulab chose came from, on stderr (stdout stays the id, for scripts)."""
    origin = answer.get("mem_origin")
    if origin:
        click.echo(f"gpulab: --mem {safe(origin)}", err=True)


def with_estimate(ctx: Context, spec: JobSpec, factory_argv: list[str]) -> JobSpec:
    """A `train` job with no `--mem` (or `--mem auto`) and no profile to learn from yet: trace
    one training step before submitting, so its first request is an estimate, not a whole GPU."""
    memory = ctx.config.memory
    if spec.mem_bytes is not None or spec.exclusive or not memory.estimate:
        return spec
    preview = ctx.call(ctx.client().preview_memory, spec.to_json())
    if preview.get("mem_bytes"):
        return spec  # the profile has enough runs: no need to estimate
    estimate = run_estimate(factory_argv, memory.cuda_context_bytes, memory.estimate_timeout_s)
    return spec if estimate is None else replace(spec, mem_estimate=estimate)


def run_estimate(factory_argv: list[str], context_bytes: int, timeout_s: float) -> int | None:
    """`python -P -m worker.training.estimate ...` in a child; its estimate in bytes, or None
    (said on stderr) when it fails or takes too long: the job then gets a whole GPU."""
    argv = [sys.executable, "-P", "-m", "worker.training.estimate", "--context-bytes", str(context_bytes)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*argv, *factory_argv], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        click.echo(f"gpulab: no memory estimate: tracing a step took over {timeout_s:g}s", err=True)
        return None
    except OSError as exc:
        click.echo(f"gpulab: no memory estimate: {exc}", err=True)
        return None
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
        estimate = int(result["estimate_bytes"])
    except (ValueError, KeyError, TypeError):
        why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        click.echo(f"gpulab: no memory estimate: {safe(why)}", err=True)
        return None
    click.echo(
        f"gpulab: estimated peak {format_size(estimate)} per GPU (one traced step "
        f"{format_size(int(result.get('step_peak_bytes', 0)))} + CUDA context {format_size(context_bytes)}, "
        f"{time.monotonic() - started:.1f}s)",
        err=True,
    )
    return estimate


@click.command()
@click.option("--user", help="Another user's profiles (admins).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def profile(ctx: Context, /, user: str | None, as_json: bool) -> None:
    """Your learned memory profiles: recent peaks and what `--mem auto` would ask for."""
    data = ctx.call(ctx.client().profiles, user or "")
    if as_json:
        emit_json(data)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PROFILE", "RUNS", "LAST PEAKS", "MAX", "AUTO REQUEST", "EST. ERROR", "LAST JOB"):
        table.add_column(column, no_wrap=column != "PROFILE")
    for p in data["profiles"]:
        peaks = ", ".join(format_size(int(v)) for v in p["peaks"][:5]) + (", ..." if len(p["peaks"]) > 5 else "")
        errors = p.get("estimate_error") or []
        est = f"{errors[0] * 100:+.0f}%" if errors else "-"
        table.add_row(
            Text(safe(p["label"])), str(p["runs"]), peaks, format_size(int(p["max_peak_bytes"])),
            Text(safe(p["origin"])), est, str(p["last_job"]),
        )  # fmt: skip
    table_console().print(table)
