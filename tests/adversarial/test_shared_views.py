"""Breaks found while fixing issue 12 (read side): what one user's job shows in the views
everyone shares - rich markup in a name, a job-written status with NaN or deep nesting, and
one user's directory, log path and status content in another user's (or everyone's) view."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from jobs import keys
from jobs.states import JobState
from tests.adversarial.support import api
from tests.helpers.stack import Stack
from tests.helpers.users import as_user, needs_users

PATH_ENV = {"PATH": "/usr/bin:/bin"}


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in the API's JSON")

    return json.loads(text, parse_constant=refuse)


def test_rich_markup_in_a_program_name_is_shown_literally(stack: Stack, tmp_path: Path) -> None:
    """Break (found): table cells were plain strings, which rich reads as markup, so a program
    named `[link=...]x` printed an OSC 8 hyperlink escape (and `[blink]` styles) into
    every user's `gpulab queue` on a colour terminal, and altered the text everywhere else."""
    stack.start_scheduler()
    name = "[link=mailto:a@evil.example]click[blink]x"  # (no closing tags: a file name has no "/")
    program = tmp_path / name
    program.symlink_to("/bin/true")
    submitted = stack.cli("submit", "--hold", "--mem", "1GiB", "--", str(program))
    assert submitted.returncode == 0, submitted.stderr
    plain = stack.cli("queue")
    assert "[link=mailto:a@evil.example]" in plain.stdout, plain.stdout  # shown as written
    colour = dict(stack.env, FORCE_COLOR="1", TERM="xterm-256color", COLUMNS="250")
    for argv in (["queue"], ["show", submitted.stdout.strip()], ["top", "--once"]):
        out = subprocess.run(
            [sys.executable, "-m", "cli", *argv], env=colour, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "\x1b]8;" not in out.stdout and "\x1b[5m" not in out.stdout, f"{argv}: {out.stdout!r}"


def test_nan_and_deep_nesting_in_a_status_file_keep_the_api_json_valid(stack: Stack, tmp_path: Path) -> None:
    """Break (found): the worker parses the status file with json.loads (NaN, Infinity
    accepted) and the record kept them, so `show --json` and the API emitted `NaN`, which
    strict JSON parsers (jq, browsers, Go) refuse; a status nested 900 deep made every
    json.dumps of the record raise RecursionError (HTTP 500 for the queue)."""
    stack.start_scheduler()
    stack.start_worker()
    status = tmp_path / "status.json"
    status.write_text('{"kind": "training", "epoch": 1, "epochs": 2, "loss": NaN, "eta_s": Infinity}')
    nan_job = stack.submit("--mem", "1GiB", "--", "/bin/sh", "-c", f'cat {status} > "$GPULAB_STATUS_FILE"')
    deep = tmp_path / "deep.json"
    deep.write_text('{"kind": "other", "x": ' + "[" * 900 + "]" * 900 + "}")
    deep_job = stack.submit("--mem", "1GiB", "--", "/bin/sh", "-c", f'cat {deep} > "$GPULAB_STATUS_FILE"')
    for job in (nan_job, deep_job):
        stack.wait_state(job, JobState.COMPLETED, JobState.FAILED)
    shown = stack.cli("show", "--json", str(nan_job))
    assert shown.returncode == 0, shown.stderr
    record = _strict_json(shown.stdout)
    assert record["status"]["loss"] is None and record["status"]["epoch"] == 1, record["status"]
    listing = stack.cli("queue", "--all", "--json")
    assert listing.returncode == 0, listing.stderr
    _strict_json(listing.stdout)
    assert stack.cli("queue", "--all").returncode == 0
    assert stack.redis.hstrlen(keys.job(deep_job), "status") < 1000


def test_a_launch_failure_does_not_show_the_jobs_directory_on_the_status_page(web_stack: Stack, tmp_path: Path) -> None:
    """Break (found): the status page is everyone's (no caller identity; JobRecord.to_json
    with private=False), but a LaunchFailed detail quotes the job's program and directory
    (`cannot start 'x' in /home/alice/thesis-draft: ...`), shown under Recent failures."""
    stack = web_stack
    stack.start_scheduler()
    stack.start_worker()
    secret_dir = tmp_path / "private-thesis-dir-4c1e"
    secret_dir.mkdir()
    job = stack.cli("submit", "--hold", "--mem", "1GiB", "--", "true", cwd=secret_dir)
    assert job.returncode == 0, job.stderr
    job_id = int(job.stdout)
    secret_dir.rmdir()
    assert stack.cli("release", str(job_id)).returncode == 0
    failed = stack.wait_state(job_id, JobState.FAILED, JobState.COMPLETED)
    assert failed.reason == "LaunchFailed", failed
    port = stack.web_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
        html = page.read().decode()
    assert "LaunchFailed" in html  # the job is listed, with its reason
    assert "private-thesis-dir-4c1e" not in html, "the job's directory is on everyone's status page"


@needs_users
def test_another_user_sees_no_directory_log_path_status_text_or_launch_detail(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    """Break (found): JobRecord.to_json(private=False) hid the command and environment only:
    other users still got the job's directory (spec.cwd), its log path, the whole job-written
    status (any metrics or text it put there) and LaunchFailed details quoting the directory,
    in `show`, `queue --all`, `history` and `wait`. They keep the numeric progress."""
    alice, bob = users["gpulab-alice"], users["gpulab-bob"]
    token = "alice-secret-7f3a"
    workdir = shared_dir / f"proj-{token}"
    workdir.mkdir()
    os.chown(workdir, alice.pw_uid, alice.pw_gid)
    status = json.dumps({"kind": "training", "epoch": 1, "epochs": 4, "step": 7, "loss": 0.5,
                         "metrics": {"note": token}, "extra": token})  # fmt: skip
    script = f"printf '%s' '{status}' > \"$GPULAB_STATUS_FILE\""
    sock = multi_stack.state_dir / "gpulab.sock"
    ran = {"command": ["/bin/sh", "-c", script, token], "cwd": str(workdir), "mem_bytes": 2**30, "env": PATH_ENV}
    gone = workdir / "gone"
    gone.mkdir()
    os.chown(gone, alice.pw_uid, alice.pw_gid)
    failing = {**ran, "cwd": str(gone), "hold": True}
    submitted = as_user(alice, lambda: [api(sock, "POST", "/v1/jobs", ran), api(sock, "POST", "/v1/jobs", failing)])
    (s1, a1), (s2, a2) = submitted["ok"]
    assert s1 == 200 and s2 == 200, submitted
    ran_id, failing_id = int(a1["id"]), int(a2["id"])
    multi_stack.wait_state(ran_id, JobState.COMPLETED)
    shutil.rmtree(gone)
    assert multi_stack.cli("release", str(failing_id)).returncode == 0
    assert multi_stack.wait_state(failing_id, JobState.FAILED).reason == "LaunchFailed"

    def bobs_views() -> list[Any]:
        return [
            api(sock, "GET", f"/v1/jobs/{ran_id}"),
            api(sock, "GET", f"/v1/jobs/{failing_id}"),
            api(sock, "GET", "/v1/jobs?all=1"),
            api(sock, "GET", "/v1/history"),
            api(sock, "GET", f"/v1/jobs/{ran_id}/wait?timeout=1"),
        ]

    seen = as_user(bob, bobs_views)["ok"]
    assert all(status == 200 for status, _ in seen), seen
    text = json.dumps(seen)
    assert token not in text, f"alice's directory, argv or status text reached bob: {text[:2000]}"
    assert ".log" not in text, "alice's log path reached bob"
    shown = seen[0][1]
    assert (shown["status"]["epoch"], shown["status"]["loss"]) == (1, 0.5)  # progress stays public
    # alice herself still sees all of it
    mine = as_user(alice, lambda: api(sock, "GET", f"/v1/jobs/{ran_id}"))["ok"][1]
    assert mine["spec"]["cwd"] == str(workdir) and mine["status"]["extra"] == token and mine["log_path"]
