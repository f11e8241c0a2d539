"""The `gpulab` command line. Read commands take `--json`; bad input exits 2 with one line.

The CLI talks to the scheduler's API on its Unix socket and never holds Redis credentials.
Daemon commands (`scheduler`, `worker`, `up`) import their packages lazily.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from cli import job_ids, memory, ops, queue, render
from cli import logs as logs_cmd
from cli.context import EXIT_USAGE, Context, emit_json, fail, pass_ctx
from cli.env_capture import captured_env
from cli.notify import notify_fields, notify_group, notify_options, print_new_secret
from cli.policy_options import node_group, policy_options, spec_fields
from cli.run import run_command
from jobs.config import ConfigError
from jobs.spec import JobSpec, SpecError, parse_time_limit, validate_spec
from jobs.training_command import factory_stem, resolve_factory, training_argv
from jobs.version import gpulab_version

# Variables that describe the submitting shell's GPU view, not the job's: the worker sets them.
NOT_CAPTURED = frozenset(
    {
        "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPULAB_JOB_ID", "GPULAB_ATTEMPT",
        "GPULAB_ARRAY_JOB_ID", "GPULAB_ARRAY_INDEX", "GPULAB_ARRAY_TASK_COUNT",
    }
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gpulab_version(), "-V", "--version", prog_name="gpulab", message="%(prog)s %(version)s")
def main() -> None:
    """gpulab: a GPU job scheduler for shared lab servers."""


def build_spec(
    command: tuple[str, ...], gpus: int, mem: str | None, name: str | None, priority: int,
    time_limit: str | None, hold: bool, requeue: bool, kind: str, policy: dict[str, Any] | None = None,
    export: str | None = None, env_file: str | None = None,
) -> JobSpec:  # fmt: skip
    try:
        env = captured_env(os.environ, NOT_CAPTURED, export=export, env_file=env_file)
        mem_bytes, mem_auto = memory.parse_mem_option(mem)
        spec = JobSpec(
            command=command,
            cwd=os.getcwd(),
            gpus=gpus,
            mem_bytes=mem_bytes,
            mem_auto=mem_auto,
            name=name or "",
            env=env,
            time_limit_s=parse_time_limit(time_limit) if time_limit is not None else None,
            priority=priority,
            requeue=requeue,
            hold=hold,
            kind=kind,
            **spec_fields(policy or {}),
            **notify_fields(policy or {}),
        )
        validate_spec(spec)
    except SpecError as exc:
        fail(str(exc), EXIT_USAGE)
    return spec


def submit_options(fn: Any) -> Any:
    options = [
        click.option("--gpus", type=int, default=1, show_default=True, help="GPUs on one node."),
        click.option(
            "--mem",
            help="Memory per GPU (12GiB, 12G, 12000MiB), or auto: learned from this job's earlier runs. "
            "Without it: learned once the job has enough runs, else a whole idle GPU.",
        ),
        click.option("--name", help="Job name (default: the program's name)."),
        click.option("--priority", type=int, default=0, show_default=True, help="Higher starts first."),
        click.option("--time", "time_limit", help="Time limit: 30m, 2h, 1-12:00:00, 90:00."),
        click.option("--hold", is_flag=True, help="Submit held; start with `gpulab release`."),
        click.option("--json", "as_json", is_flag=True, help="Print the whole record, not just the id."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _submit(ctx: Context, spec: JobSpec, as_json: bool, as_user: str | None = None) -> None:
    client = ctx.client()
    body = spec.to_json()
    if as_user:
        body["user"] = as_user  # admins only; the scheduler checks
    answer = ctx.call(client.submit_answer, body)
    job_id = int(answer["id"])
    print_new_secret(answer)
    memory.announce(answer)
    if as_json:
        emit_json(ctx.call(client.job, job_id))
    else:
        click.echo(job_id)


@main.command(context_settings={"ignore_unknown_options": True})
@submit_options
@policy_options
@notify_options
@click.option("--requeue/--no-requeue", default=None, help="Run again after a node loss (default: on for --train).")
@click.option("--train", "factory", help="Run the built-in training loop with this factory (module:func or file.py).")
@click.option("--export", help="Pass only these variables (NAME,NAME; plus PATH/HOME/USER/LANG), or ALL, or NONE.")
@click.option("--env-file", help="Add KEY=VALUE lines from this file to the job's environment (values never shown).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def submit(
    ctx: Context, /, command: tuple[str, ...], gpus: int, mem: str | None, name: str | None, priority: int,
    time_limit: str | None, hold: bool, as_json: bool, requeue: bool | None, factory: str | None,
    export: str | None, env_file: str | None, **policy: Any,
) -> None:  # fmt: skip
    """Queue a job: gpulab submit [OPTIONS] -- PROGRAM ARGS..."""
    kind = "command"
    if factory:  # the same road as `gpulab train FACTORY -- ARGS`, with the same defaults
        command, stem = training_command(factory, [], command, gpus)
        name, kind = name or stem, "training"
    spec = build_spec(
        command, gpus, mem, name, priority, time_limit, hold, _requeue(requeue, kind), kind, policy, export, env_file
    )
    if factory:
        spec = memory.with_estimate(ctx, spec, _estimate_argv(spec.command))
    _submit(ctx, spec, as_json, policy.get("as_user"))


def _estimate_argv(command: tuple[str, ...]) -> list[str]:
    """The estimate's arguments from the loop's argv: the factory, the loop's own options, -- ARGS."""
    return list(command[command.index("worker.training") + 1 :])


def training_command(
    factory: str, loop_args: list[str], factory_args: tuple[str, ...], gpus: int = 1
) -> tuple[tuple[str, ...], str]:
    """The built-in loop's argv and a default job name. `-P`: the job's cwd is not put first on
    sys.path, so nothing in the user's project can shadow gpulab's own modules (the loop adds
    the cwd at the end of the path to import the user's factory)."""
    try:
        factory = resolve_factory(factory)
    except FileNotFoundError as exc:
        fail(f"train: no such file: {exc}", EXIT_USAGE)
    return training_argv(sys.executable, factory, loop_args, factory_args, gpus), factory_stem(factory)


def _requeue(flag: bool | None, kind: str) -> bool:
    return flag if flag is not None else kind == "training"


@main.command(context_settings={"ignore_unknown_options": True})
@submit_options
@policy_options
@notify_options
@click.option("--epochs", type=int, help="Epochs to train.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), help="Mixed precision.")
@click.option("--checkpoint-steps", type=int, help="Checkpoint every N optimizer steps (default: every 10 min).")
@click.option("--requeue/--no-requeue", default=True, show_default=True)
@click.argument("factory")
@click.argument("factory_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def train(
    ctx: Context, /, factory: str, factory_args: tuple[str, ...], gpus: int, mem: str | None, name: str | None,
    priority: int, time_limit: str | None, hold: bool, as_json: bool, epochs: int | None, seed: int | None,
    amp: str | None, requeue: bool, checkpoint_steps: int | None, **policy: Any,
) -> None:  # fmt: skip
    """Train with the built-in loop: gpulab train examples/digits.py --mem 4GiB --epochs 20"""
    loop_args: list[str] = []
    options = (("--epochs", epochs), ("--seed", seed), ("--amp", amp), ("--checkpoint-every-steps", checkpoint_steps))
    for flag, value in options:
        if value is not None:
            loop_args += [flag, str(value)]
    command, stem = training_command(factory, loop_args, factory_args, gpus)
    spec = build_spec(command, gpus, mem, name or stem, priority, time_limit, hold, requeue, "training", policy)
    spec = memory.with_estimate(ctx, spec, _estimate_argv(command))
    _submit(ctx, spec, as_json, policy.get("as_user"))


queue_cmd = queue.queue_cmd
main.add_command(queue_cmd)
main.add_command(queue_cmd, name="q")
main.add_command(node_group)
main.add_command(notify_group)


@main.command()
@click.argument("job_id", type=job_ids.JOB_ID)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show(ctx: Context, job_id: int, as_json: bool) -> None:
    """Everything about one job, with its history."""
    data = ctx.call(ctx.client().job, job_id)
    if as_json:
        emit_json(data)
    else:
        render.show_job(render.table_console(), data)


for command in (job_ids.cancel, job_ids.hold, job_ids.release):
    main.add_command(command)


@main.command()
@click.argument("job_ids", type=job_ids.JOB_ID, nargs=-1, required=True)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit 124).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def wait(ctx: Context, job_ids: tuple[int, ...], timeout: float | None, as_json: bool) -> None:
    """Block until the jobs end. Exit 0 if all COMPLETED, else the first failure's exit code
    (1 when it has none, e.g. cancelled or OOM); 124 on --timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    client, results = ctx.client(), []
    for job_id in job_ids:
        while True:
            left = 60.0 if deadline is None else max(0.0, min(60.0, deadline - time.monotonic()))
            record = ctx.call(client.wait, job_id, left)
            if record["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            if deadline is not None and time.monotonic() >= deadline:
                fail(f"job {job_id} is still {record['state']} after {timeout}s", 124)
        results.append(record)
    if as_json:
        emit_json(results)
    else:
        for r in results:
            click.echo(
                f"{r['id']} {r['state']}"
                + (f" {r['reason']}" if r["reason"] else "")
                + (f" exit {r['exit_code']}" if r.get("exit_code") is not None else "")
            )
    sys.exit(wait_exit_code(results))


def wait_exit_code(records: list[dict[str, Any]]) -> int:
    for r in records:
        if r["state"] != "COMPLETED":
            code = r.get("exit_code")
            return int(code) if code else 1
    return 0


@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def gpus(ctx: Context, as_json: bool) -> None:
    """Per GPU: total, used, reserved by gpulab, used by others, available."""
    data = ctx.call(ctx.client().gpus)
    if as_json:
        emit_json(data)
    else:
        render.table_console().print(render.gpus_table(data["nodes"]))


# ---- daemons ----------------------------------------------------------------------------------
def _sim_gpus(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    from worker.sim_probe import parse_sim_gpus

    try:
        return parse_sim_gpus(spec)
    except ValueError as exc:
        fail(f"--sim-gpus: {exc}", EXIT_USAGE)


def _allow_mixed(_ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:  # read by jobs.daemons.Presence, like the variable set by a systemd drop-in
        os.environ["GPULAB_ALLOW_MIXED_VERSIONS"] = "1"
    return value


allow_mixed_option = click.option(
    "--allow-mixed-versions", is_flag=True, callback=_allow_mixed, expose_value=True,
    help="Start even if a live daemon runs another gpulab version (a rolling upgrade).",
)  # fmt: skip


def _daemon_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")


@main.command()
@click.option("-v", "--verbose", is_flag=True)
@allow_mixed_option
@pass_ctx
def scheduler(ctx: Context, verbose: bool, allow_mixed_versions: bool) -> None:
    """Run the scheduler daemon (API socket + scheduling loop)."""
    from jobs.daemons import VersionMismatch
    from jobs.redis_conn import RedisUnavailable
    from scheduler.main import run_scheduler

    _daemon_logging(verbose)
    try:
        sys.exit(run_scheduler(ctx.config))
    except (RedisUnavailable, ConfigError, VersionMismatch) as exc:
        fail(str(exc))


@main.command()
@click.option("--name", help="Node name (default: config [worker] name, else the host name).")
@click.option("--sim-gpus", help="Simulate GPUs: 2x24GiB or 24GiB,16GiB.")
@click.option("-v", "--verbose", is_flag=True)
@allow_mixed_option
@pass_ctx
def worker(ctx: Context, name: str | None, sim_gpus: str | None, verbose: bool, allow_mixed_versions: bool) -> None:
    """Run a worker daemon for this host's GPUs."""
    from jobs.daemons import VersionMismatch
    from jobs.redis_conn import RedisUnavailable
    from worker.daemon import NodeNameTaken
    from worker.main import run_worker
    from worker.nvml_probe import GpuProbeError

    _daemon_logging(verbose)
    try:
        sys.exit(run_worker(ctx.config, name, _sim_gpus(sim_gpus)))
    except (RedisUnavailable, NodeNameTaken, ConfigError, VersionMismatch, GpuProbeError) as exc:
        fail(str(exc))


@main.command()
@click.option("--sim-gpus", help="Simulate GPUs (default when NVML finds none: 2x24GiB).")
@click.option("--name", help="Node name of the worker.")
@pass_ctx
def up(ctx: Context, sim_gpus: str | None, name: str | None) -> None:
    """Redis (embedded if none) + scheduler + worker in the foreground. Ctrl-C stops all."""
    from cli.stack import run_stack

    _sim_gpus(sim_gpus)  # validate before starting anything
    sys.exit(run_stack(ctx.config, sim_gpus=sim_gpus, name=name))


for command in (ops.history, ops.top, ops.doctor):
    main.add_command(command)
main.add_command(logs_cmd.logs)
main.add_command(memory.profile)
main.add_command(run_command)  # gpulab run: interactive jobs (cli/run.py)


def run() -> None:
    """Entry point: click's usage errors become one line on stderr with exit code 2."""
    try:
        main.main(prog_name="gpulab", standalone_mode=False)
    except click.UsageError as exc:
        # fail() says "gpulab: " once; the subcommand's path (e.g. "node drain: ") follows it.
        path = exc.ctx.command_path.split(" ", 1)[1:] if exc.ctx else []
        where = f"{path[0]}: " if path else ""
        fail(f"{where}{exc.format_message()}", EXIT_USAGE)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("aborted", 1)


if __name__ == "__main__":
    run()
