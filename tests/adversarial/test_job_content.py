"""Break 4: job-written and job-named content is trusted by the read paths every user shares.
A status file with wrong types breaks `gpulab queue`, `show`, `top` and the status page for
everyone; escape sequences in job-controlled text reach other people's terminals raw."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from jobs import keys
from jobs.states import JobState
from tests.adversarial.support import HOSTILE_TEXT, control_chars, hold_script, unblock_fifo
from tests.helpers.stack import Stack, eventually

WRONG_TYPES = {
    "kind": "training", "loss": "x", "epoch": "y", "step": [1], "epochs": {"a": 1},
    "samples_per_s": "fast", "eta_s": "soon", "metrics": [1, 2],
}  # fmt: skip


PROBE_STATUS = {"kind": "training", "epoch": 1, "epochs": 2, "step": 1, "loss": 0.5}


def _status_job(stack: Stack, status: dict, tmp_path: Path, name: str) -> tuple[int, Path]:
    """A running job that has written `status` to its status file and holds on a FIFO."""
    fifo = stack.fifo(name)
    write = 'printf \'%s\' "$GPULAB_TEST_STATUS" > "$GPULAB_STATUS_FILE"'
    env_file = tmp_path / f"{name}.env"
    env_file.write_text(f"GPULAB_TEST_STATUS={json.dumps(status)}\n")
    job = stack.submit("--mem", "1GiB", "--env-file", str(env_file), "--", *hold_script(write), str(fifo))
    stack.wait_log(job, "holding")
    return job, fifo


def _running_with_status(stack: Stack, status: dict, tmp_path: Path) -> tuple[int, list[Path]]:
    """The hostile job, running with `status` written, and proof that the worker has looked
    at it: a well-behaved probe job started after it has had its own status stored (the
    worker reads every job's status file in each heartbeat, so it has read the hostile one
    too, and stored it unless it refused it)."""
    job, fifo = _status_job(stack, status, tmp_path, "hostile")
    probe, probe_fifo = _status_job(stack, PROBE_STATUS, tmp_path, "probe")
    eventually(lambda: stack.redis.hget(keys.job(probe), "status"))
    return job, [fifo, probe_fifo]


def test_status_file_with_wrong_types_does_not_break_the_shared_views(web_stack: Stack, tmp_path: Path) -> None:
    """Break 4 (types): the worker stores any JSON object the job writes (worker/runner.py
    JobRunner.read_status) and jobs/render.py _progress formats it with `:.4g`/`:.0f`
    (and show_job calls .items() on metrics), so `queue`, `show`, `top --once` and the status
    page (scheduler/status_page.py render_page -> HTTP 500) all crash."""
    stack = web_stack
    stack.start_scheduler()
    stack.start_worker()
    job, fifos = _running_with_status(stack, WRONG_TYPES, tmp_path)
    try:
        broken = {}
        for argv in (["queue"], ["queue", "--all"], ["show", str(job)], ["top", "--once"]):
            result = stack.cli(*argv)
            if result.returncode != 0:
                broken[" ".join(argv)] = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        port = stack.web_port  # type: ignore[attr-defined]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
                page.read()
        except urllib.error.HTTPError as exc:
            broken["status page"] = f"HTTP {exc.code}"
        assert not broken, f"one job's status file broke the shared views: {broken}"
    finally:
        for fifo in fifos:
            unblock_fifo(fifo)


def _raw_controls(stack: Stack, *argv: str) -> list[str]:
    result = stack.cli(*argv)
    assert result.returncode == 0, result.stderr
    return control_chars(result.stdout + result.stderr)


def test_escape_sequences_in_job_name_and_directory_are_not_printed_raw(stack: Stack, tmp_path: Path) -> None:
    """Break 4 (control chars, names): the job's name defaults to the basename of its
    program (jobs/spec.py JobSpec.display_name: only --name is checked) and its directory is
    any path (validate_spec only refuses NUL); jobs/render.py queue_table/show_job print
    both through rich, which passes ESC through. Every user's `gpulab queue` shows the name."""
    stack.start_scheduler()  # no worker: the job stays in the queue
    evil_dir = tmp_path / f"dir{HOSTILE_TEXT}"
    evil_dir.mkdir()
    program = evil_dir / f"prog{HOSTILE_TEXT}"
    program.symlink_to("/bin/true")
    job = stack.cli("submit", "--mem", "1GiB", "--", str(program), cwd=evil_dir)
    if job.returncode == 2:  # refused at submit: fine, nothing to show
        return
    assert job.returncode == 0, job.stderr
    job_id = int(job.stdout)
    found = {" ".join(a): _raw_controls(stack, *a) for a in (["queue"], ["show", str(job_id)])}
    assert not {k: v for k, v in found.items() if v}, "raw control characters reach the terminal"


def test_escape_sequences_in_status_text_are_not_printed_raw(stack: Stack, tmp_path: Path) -> None:
    """Break 4 (control chars, progress): training progress comes from the job's status file
    and jobs/render.py _progress / show_job print its strings raw in `queue`, `show`, `top`."""
    stack.start_scheduler()
    stack.start_worker()
    status = {"kind": "training", "epoch": HOSTILE_TEXT, "epochs": 3, "step": HOSTILE_TEXT,
              "metrics": {f"acc{HOSTILE_TEXT}": HOSTILE_TEXT}}  # fmt: skip
    job, fifos = _running_with_status(stack, status, tmp_path)
    try:
        found = {" ".join(a): _raw_controls(stack, *a) for a in (["queue"], ["show", str(job)], ["top", "--once"])}
        assert not {k: v for k, v in found.items() if v}, "raw control characters reach the terminal"
    finally:
        for fifo in fifos:
            unblock_fifo(fifo)


def test_job_written_status_is_capped_in_size(stack: Stack, tmp_path: Path) -> None:
    """Break (found): the status file has no size cap (worker/runner.py JobRunner.read_status
    reads it whole, worker/daemon.py publish_heartbeat stores it), and every user's
    `gpulab queue` returns it (jobs/record.py JobRecord.to_json keeps `status` public). One job
    can put megabytes into Redis and into everyone's queue listing."""
    stack.start_scheduler()
    stack.start_worker()
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"kind": "other", "pad": "A" * (8 * 2**20)}))
    job = stack.submit("--mem", "1GiB", "--", "/bin/sh", "-c", f'cat {big} > "$GPULAB_STATUS_FILE"')
    stack.wait_state(job, JobState.COMPLETED, JobState.FAILED)  # the worker reads the status as it ends
    stored = stack.redis.hstrlen(keys.job(job), "status")
    assert stored <= 2**20, f"{stored} bytes of job-written status stored in the record"
    os.unlink(big)


def test_escape_sequences_in_a_launch_failure_detail_are_not_printed_raw(stack: Stack, tmp_path: Path) -> None:
    """Break 4 (control chars, reasons): when a job cannot start, worker/runner.py
    JobRunner.start writes `cannot start ... in {cwd}` with the job's directory unescaped into
    the reason detail, which `gpulab queue --all` (everyone's) and `show` print raw."""
    stack.start_scheduler()
    stack.start_worker()
    evil_dir = tmp_path / f"gone{HOSTILE_TEXT}"
    evil_dir.mkdir()
    submitted = stack.cli("submit", "--hold", "--mem", "1GiB", "--", "true", cwd=evil_dir)
    if submitted.returncode == 2:  # refused at submit: fine, nothing to show
        return
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout)
    evil_dir.rmdir()  # the job cannot enter its directory any more
    assert stack.cli("release", str(job_id)).returncode == 0
    failed = stack.wait_state(job_id, JobState.FAILED, JobState.COMPLETED)
    assert failed.reason == "LaunchFailed", failed
    found = {" ".join(a): _raw_controls(stack, *a) for a in (["queue", "--all"], ["show", str(job_id)])}
    assert not {k: v for k, v in found.items() if v}, "raw control characters reach the terminal"


def test_newlines_in_a_program_name_cannot_forge_queue_rows(stack: Stack, tmp_path: Path) -> None:
    """Break (found): the default job name is the program's basename, unchecked
    (jobs/spec.py JobSpec.display_name), so a newline in it lets a user print a line of their
    choosing in everyone's `gpulab queue`, e.g. a fake job of another user."""
    stack.start_scheduler()
    forged = "4242 important-job root RUNNING"
    program = tmp_path / f"x\n{forged}\n"
    program.symlink_to("/bin/true")
    submitted = stack.cli("submit", "--hold", "--mem", "1GiB", "--", str(program))
    if submitted.returncode == 2:  # refused at submit: fine
        return
    assert submitted.returncode == 0, submitted.stderr
    queue = stack.cli("queue")
    assert queue.returncode == 0, queue.stderr
    lines = [line.strip() for line in queue.stdout.splitlines()]
    assert not any(line.startswith("4242") for line in lines), "a forged row:\n" + queue.stdout
