"""Break 7: per-user caps and hostile API input. A few submits must not grow Redis by hundreds
of MB; malformed or absurd API input gets a 4xx with one line, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import keys
from tests.adversarial.support import api
from tests.helpers.stack import Stack

MiB = 2**20


def test_huge_array_with_a_big_environment_is_refused(stack: Stack, tmp_path: Path) -> None:
    """Break 7 (caps): each array task stores its own copy of the spec with the whole
    captured environment (scheduler/submission.py Submitter._submit_array), and the only caps
    are per job (256 KiB env, 128 KiB argv: jobs/spec.py), per array ([policy]
    max_array_size = 1000) and per user by count (max_pending_per_user = 10000). So one
    `--array 0-999` with a 100 KB environment stores ~100 MB; ten of them, a gigabyte."""
    stack.start_scheduler()
    env_file = tmp_path / "big.env"
    env_file.write_text("".join(f"PAD{i}=" + "x" * 25_000 + "\n" for i in range(4)))  # ~100 KB, each runnable
    before = int(stack.redis.info("memory")["used_memory"])
    result = stack.cli(
        "submit", "--array", "0-999", "--hold", "--env-file", str(env_file), "--mem", "1GiB", "--", "true"
    )
    grown = int(stack.redis.info("memory")["used_memory"]) - before
    assert result.returncode == 2, f"accepted ({grown / MiB:.0f} MiB more in Redis from one submit)"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert stack.redis.zcard(keys.PENDING) == 0


def test_command_over_the_argv_cap_is_refused(stack: Stack) -> None:
    """Guard (no break expected): the per-job argv cap (jobs/spec.py MAX_ARGV_BYTES) holds."""
    stack.start_scheduler()
    result = stack.cli("submit", "--mem", "1GiB", "--", "true", "a" * 70_000, "b" * 70_000)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result
    assert stack.redis.get(keys.NEXT_JOB_ID) is None


HOSTILE_BODIES = {
    # json.loads raises RecursionError (not JSONDecodeError) on deep but valid nesting
    "deeply nested JSON": b"[" * 100_000 + b"]" * 100_000,
    # json.loads raises ValueError (int digit limit), not JSONDecodeError
    "integer with 5000 digits": b'{"command": ["true"], "cwd": "/", "mem_bytes": 1' + b"0" * 5000 + b"}",
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_submit_body_gets_a_4xx_not_a_500(stack: Stack, name: str) -> None:
    """Break 7 (API): scheduler/api_server.py _Handler._read_body turns only JSONDecodeError
    and UnicodeDecodeError into 400; anything else json.loads raises becomes a 500.
    (A lone surrogate in argv, also a 500: test_unrunnable_input.py.)"""
    stack.start_scheduler()
    status, answer = api(stack.state_dir / "gpulab.sock", "POST", "/v1/jobs", raw=HOSTILE_BODIES[name])
    assert 400 <= status < 500, f"{name}: HTTP {status} {answer}"
    assert stack.redis.get(keys.NEXT_JOB_ID) is None


def test_log_offset_out_of_range_gets_a_4xx_not_a_500(stack: Stack) -> None:
    """Break 7 (API): GET /v1/jobs/ID/log?offset=10**20 reaches f.seek() with an offset past
    what the OS takes (scheduler/service.py SchedulerService.log: OverflowError -> 500)."""
    stack.start_scheduler()
    stack.start_worker()
    job_id = stack.submit("--mem", "1GiB", "--", "true")
    stack.wait_for(job_id, lambda r: r.is_final)
    status, answer = api(stack.state_dir / "gpulab.sock", "GET", f"/v1/jobs/{job_id}/log?offset={10**20}")
    assert 400 <= status < 500 or (status == 200 and answer["data"] == ""), f"HTTP {status} {answer}"
