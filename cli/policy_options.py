"""CLI pieces for scheduling policy: submit's --after/--array/--exclusive/--node/--gpu-model/
--user options, and `gpulab node drain|resume NAME`."""

from __future__ import annotations

from typing import Any

import click

from cli.context import Context, pass_ctx
from jobs.api import node_path
from jobs.spec import SpecError


def _ids(flag: str, values: tuple[str, ...]) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for part in value.replace(":", ",").split(","):
            if not part.strip().isdigit():
                raise SpecError(flag, f"'{value}' is not a job id; use e.g. {flag} 12 or {flag} 12,13")
            ids.append(int(part))
    return tuple(dict.fromkeys(ids))


def policy_options(fn: Any) -> Any:
    options = [
        click.option("--after", multiple=True, metavar="ID", help="Start after job ID completed OK (repeatable)."),
        click.option("--after-any", multiple=True, metavar="ID", help="Start after job ID ended, however."),
        click.option("--array", metavar="SPEC", help="Job array: 0-31 or 0-31%4 (at most 4 running)."),
        click.option("--exclusive", is_flag=True, help="Whole GPUs, whatever --mem says."),
        click.option("--node", metavar="NAME", help="Run only on this node."),
        click.option("--gpu-model", metavar="MODEL", help="GPU name must contain MODEL (A100, 'RTX 4090')."),
        click.option(
            "--preemptible/--no-preemptible",
            default=None,
            help="May be stopped (SIGTERM) and requeued for a higher-priority job (default: yes for --train).",
        ),
        click.option("--user", "as_user", metavar="NAME", help="Admins: submit on behalf of NAME."),
        click.option(
            "--oom-retry",
            type=int,
            default=0,
            metavar="N",
            help="After a CUDA OOM: rerun with 1.25x its peak, up to N times.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def spec_fields(policy: dict[str, Any]) -> dict[str, Any]:
    """JobSpec keyword arguments from the policy options (raises SpecError on bad input)."""
    return {
        "after_ok": _ids("--after", policy.get("after") or ()),
        "after_any": _ids("--after-any", policy.get("after_any") or ()),
        "array": policy.get("array") or "",
        "exclusive": bool(policy.get("exclusive")),
        "node": policy.get("node") or "",
        "gpu_model": policy.get("gpu_model") or "",
        "oom_retry": int(policy.get("oom_retry") or 0),
        "preemptible": policy.get("preemptible"),
    }


@click.group(name="node")
def node_group() -> None:
    """Node administration: drain (no new jobs; running ones finish) and resume."""


@node_group.command()
@click.argument("name")
@click.option("--reason", default="", help="Shown in `gpulab gpus`.")
@pass_ctx
def drain(ctx: Context, /, name: str, reason: str) -> None:
    """Stop placing jobs on NAME; its running jobs finish."""
    answer = ctx.call(lambda: ctx.client().request("POST", node_path(name, "drain"), {"reason": reason}))
    click.echo(f"{answer['node']} draining")


@node_group.command()
@click.argument("name")
@pass_ctx
def resume(ctx: Context, /, name: str) -> None:
    """Place jobs on NAME again."""
    answer = ctx.call(lambda: ctx.client().request("POST", node_path(name, "resume"), {}))
    click.echo(f"{answer['node']} resumed")
