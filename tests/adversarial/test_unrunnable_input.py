"""Break 5: input that passes validation at submit but can never run. Desired: refused at
submit (HTTP 4xx from the API; exit code 2 and one line from the CLI), nothing stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import keys
from tests.adversarial.support import api
from tests.helpers.stack import Stack

BASE = {"command": ["true"], "cwd": "/", "mem_bytes": 2**30, "env": {"PATH": "/usr/bin:/bin"}}
LONE_SURROGATE = "\ud800"  # valid in a JSON string ("\\ud800"), not encodable for execve

UNRUNNABLE = {
    "argv with a lone surrogate": {**BASE, "command": ["echo", f"a{LONE_SURROGATE}"]},
    "program with a lone surrogate": {**BASE, "command": [f"/bin/true{LONE_SURROGATE}"]},
    "env value with a lone surrogate": {**BASE, "env": {"PATH": "/usr/bin:/bin", "X": LONE_SURROGATE}},
    "env name with a lone surrogate": {**BASE, "env": {"PATH": "/usr/bin:/bin", f"X{LONE_SURROGATE}": "1"}},
    "cwd with a lone surrogate": {**BASE, "cwd": f"/tmp/{LONE_SURROGATE}"},
    "cwd longer than PATH_MAX": {**BASE, "cwd": "/" + "a/" * 3000},
    "one env string over MAX_ARG_STRLEN (128 KiB)": {**BASE, "env": {"PATH": "/usr/bin:/bin", "BIG": "x" * 140_000}},
}


@pytest.mark.parametrize("name", list(UNRUNNABLE))
def test_unrunnable_submission_is_refused_at_submit(stack: Stack, name: str) -> None:
    """Break 5: jobs/spec.py validate_spec checks NUL and '=' but not what execve/chdir
    need: strings Python cannot encode for the OS (lone surrogates: Popen raises
    UnicodeEncodeError, not OSError, so worker/runner.py JobRunner.start does not even record
    LaunchFailed and the job is re-dispatched forever), a single env string past the kernel's
    MAX_ARG_STRLEN (E2BIG at exec) and a cwd past PATH_MAX (ENAMETOOLONG)."""
    stack.start_scheduler()
    status, answer = api(stack.state_dir / "gpulab.sock", "POST", "/v1/jobs", UNRUNNABLE[name])
    assert 400 <= status < 500, f"{name}: answered {status} {answer}; it can never start: refuse it with a 4xx"
    assert len(str(answer.get("error", "")).splitlines()) == 1
    assert stack.redis.zcard(keys.PENDING) == 0 and stack.redis.get(keys.NEXT_JOB_ID) is None


def test_cli_refuses_an_env_string_too_long_to_exec(stack: Stack, tmp_path: Path) -> None:
    """Break 5 (CLI): `--env-file` with one 140 KB value passes the 256 KiB total check
    (jobs/spec.py validate_spec, MAX_ENV_BYTES), then execve fails with E2BIG at launch."""
    stack.start_scheduler()
    env_file = tmp_path / "big.env"
    env_file.write_text("BIG=" + "x" * 140_000 + "\n")
    result = stack.cli("submit", "--export", "NONE", "--env-file", str(env_file), "--mem", "1GiB", "--", "true")
    assert result.returncode == 2, f"accepted as job {result.stdout.strip()}; it can never start"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert stack.redis.get(keys.NEXT_JOB_ID) is None
