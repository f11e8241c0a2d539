"""The CLI's daily promises on one real stack (scheduler + one simulated-GPU worker, shared by
the module): bulk cancel/hold/release in one request, queue filters, order and paging,
`--json` on read commands, `--version`, job-id completion and one-prefix error lines."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, release


@pytest.fixture(scope="module")
def daily(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    stack = Stack(tmp_path_factory.mktemp("daily"), redis_server.url, client)
    stack.env["COLUMNS"] = "200"
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    yield stack
    stack.stop()
    client.close()


@pytest.fixture(scope="module")
def blocker(daily: Stack) -> Iterator[int]:
    """A running job the module's other jobs depend on (`--after`), so they stay PENDING."""
    fifo = daily.fifo("blocker")
    job = daily.submit("--mem", "1GiB", "--name", "blocker", *daily.hold_job_args("1GiB", fifo))
    daily.wait_state(job, JobState.RUNNING)
    yield job
    if daily.store.get(job) and not daily.store.get(job).is_final:  # type: ignore[union-attr]
        release(fifo)


def _submit_waiting(stack: Stack, blocker: int, *args: str) -> int:
    return stack.submit("--mem", "1GiB", "--after", str(blocker), *args, "--", sys.executable, "-c", "pass")


def _cli_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=60)


def _states(stack: Stack, ids: list[int]) -> list[str]:
    return [stack.store.get(j).state.value for j in ids]  # type: ignore[union-attr]


def test_bulk_actions_take_ranges_lists_and_arrays_in_one_request(daily: Stack, blocker: int) -> None:
    singles = [_submit_waiting(daily, blocker) for _ in range(4)]
    out = json.loads(daily.cli("submit", "--mem", "1GiB", "--after", str(blocker), "--hold", "--array", "0-5",
                               "--json", "--", sys.executable, "-c", "pass").stdout)  # fmt: skip
    array_id = out["array_id"]
    tasks = list(range(array_id, array_id + 6))

    held = daily.cli("hold", f"{singles[0]}-{singles[2]}", str(singles[3]))
    assert held.returncode == 0, held.stderr
    assert held.stdout.split("\n")[:4] == [f"{j} HELD" for j in singles]
    assert _states(daily, singles) == ["HELD"] * 4

    released = daily.cli("release", "--array", str(array_id), "--json")
    assert released.returncode == 0, released.stderr
    assert [(r["id"], r["state"]) for r in json.loads(released.stdout)] == [(t, "PENDING") for t in tasks]

    # One job in a wrong state and one that does not exist: the rest are done, each is told.
    mixed = daily.cli("release", ",".join(str(j) for j in singles[:2]), str(tasks[0]), "999999")
    assert mixed.returncode == 2
    assert mixed.stdout.splitlines() == [f"{singles[0]} PENDING", f"{singles[1]} PENDING"]
    assert mixed.stderr.splitlines() == [
        f"gpulab: cannot release job {tasks[0]}: it is PENDING",
        "gpulab: no job 999999",
    ]

    not_array = daily.cli("cancel", "--array", str(singles[0]))
    assert not_array.returncode == 2 and "not an array's id" in not_array.stderr
    assert _states(daily, singles[:1]) == ["PENDING"]

    cancelled = daily.cli("cancel", "--array", str(array_id), *(str(j) for j in singles))
    assert cancelled.returncode == 0, cancelled.stderr
    assert _states(daily, tasks + singles) == ["CANCELLED"] * 10
    again = daily.cli("cancel", str(singles[0]))
    assert again.returncode == 0 and again.stdout.strip() == f"{singles[0]} CANCELLED (already finished)"


def test_bulk_cancel_stops_a_running_job_too(daily: Stack) -> None:
    fifo = daily.fifo("bulk-running")
    running = daily.submit("--mem", "1GiB", *daily.hold_job_args("1GiB", fifo))
    daily.wait_state(running, JobState.RUNNING)
    result = daily.cli("cancel", str(running))
    assert result.returncode == 0 and result.stdout.strip() == f"{running} CANCELLING", result
    daily.wait_state(running, JobState.CANCELLED)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cancel", "5-2"], "ranges go up"),
        (["hold", "1-999999999"], "more than"),
        (["release", "x"], "not a job id"),
        (["cancel", "0"], "ids start at 1"),
        (["show", "-3"], "No such option"),
    ],
)
def test_bad_job_ids_exit_2_with_one_line(daily: Stack, args: list[str], needle: str) -> None:
    result = daily.cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not lines[0].startswith("gpulab: gpulab") and lines[0].count("error:") <= 1


def test_job_ids_complete_from_the_api(daily: Stack, blocker: int) -> None:
    env = {**daily.env, "_GPULAB_COMPLETE": "bash_complete", "COMP_WORDS": "gpulab show ", "COMP_CWORD": "2"}
    result = _cli_env(env, "show")
    assert f"plain,{blocker}" in result.stdout.splitlines(), result
    gone = {**env, "GPULAB_STATE_DIR": str(daily.tmp_path / "nowhere")}
    quiet = _cli_env(gone, "show")
    assert quiet.returncode == 0 and quiet.stdout.strip() == "" and quiet.stderr == ""


def test_version(daily: Stack) -> None:
    result = daily.cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("gpulab "), result
    short = daily.cli("-V")
    assert short.stdout == result.stdout


def _queue(stack: Stack, *args: str) -> dict[str, Any]:
    result = stack.cli("queue", "--json", *args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_queue_filters_order_and_priority_parts(daily: Stack, blocker: int) -> None:
    low = _submit_waiting(daily, blocker, "--name", "sweep-low")
    high = _submit_waiting(daily, blocker, "--name", "sweep-high", "--priority", "5")
    other = _submit_waiting(daily, blocker, "--name", "other")
    held = _submit_waiting(daily, blocker, "--name", "sweep-held", "--hold")
    ours = {low, high, other, held}

    pending = [j for j in _queue(daily, "-t", "PENDING")["jobs"] if j["id"] in ours]
    assert [j["id"] for j in pending] == [high, low, other]  # priority first, then oldest
    assert [j["queue_position"] for j in pending] == sorted(j["queue_position"] for j in pending)
    for job in pending:
        assert set(job["priority"]) >= {"total", "priority", "fairshare", "age"}
    assert pending[0]["priority"]["priority"] > pending[1]["priority"]["priority"]

    both = [j["id"] for j in _queue(daily, "-t", "pending,HELD")["jobs"] if j["id"] in ours]
    assert both == [high, low, other, held]
    assert [j["id"] for j in _queue(daily, "-t", "PENDING", "-t", "HELD", "--name", "sweep-*")["jobs"]] == [
        high, low, held,
    ]  # fmt: skip
    assert _queue(daily, "-u", "nobody-here")["jobs"] == []
    assert {j["id"] for j in _queue(daily, "--me")["jobs"]} >= ours | {blocker}
    table = daily.cli("queue", "--name", "sweep-*")
    assert "PRIORITY=PRIO+FAIR+AGE" in table.stdout and "sweep-high" in table.stdout and "other" not in table.stdout

    bad = daily.cli("queue", "-t", "SLEEPING")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "SLEEPING" in bad.stderr, bad
    assert daily.cli("cancel", *(str(j) for j in ours)).returncode == 0


@pytest.mark.slow  # 1,020 jobs submitted and cancelled: more than one page of finished jobs
def test_queue_all_pages_past_a_thousand_finished_jobs(daily: Stack, blocker: int) -> None:
    arrays = []
    for _ in range(2):
        out = daily.cli("submit", "--mem", "1GiB", "--after", str(blocker), "--array", "0-509", "--json",
                        "--", sys.executable, "-c", "pass")  # fmt: skip
        assert out.returncode == 0, out.stderr
        arrays.append(json.loads(out.stdout)["array_id"])
    cancel = daily.cli("cancel", "--array", str(arrays[0]), "--array", str(arrays[1]))
    assert cancel.returncode == 0, cancel.stderr
    finished = daily.redis.zcard("gpulab:finished")
    assert finished > 1020  # more than one page (1,000)

    everything = _queue(daily, "--all")["jobs"]
    ended = [j for j in everything if j["state"] in ("COMPLETED", "FAILED", "CANCELLED")]
    assert len(ended) == finished and len({j["id"] for j in ended}) == finished
    assert len([j for j in _queue(daily, "--all", "--limit", "7")["jobs"] if j["state"] == "CANCELLED"]) == 7

    first = _queue(daily, "--cursor", "0", "--limit", "5", "-t", "CANCELLED")
    second = _queue(daily, "--cursor", str(first["next_cursor"]), "--limit", "5", "-t", "CANCELLED")
    assert first["next_cursor"] == 5 and second["next_cursor"] == 10
    ids = [j["id"] for j in first["jobs"] + second["jobs"]]
    assert len(ids) == len(set(ids)) == 10 and ids == sorted(ids, reverse=True)


def test_top_and_doctor_speak_json(daily: Stack, blocker: int) -> None:
    top = daily.cli("top", "--json")
    assert top.returncode == 0, top.stderr
    snapshot = json.loads(top.stdout)
    assert [n["name"] for n in snapshot["nodes"]] == ["n1"] and len(snapshot["nodes"][0]["gpus"]) == 1
    assert blocker in {j["id"] for j in snapshot["jobs"]}
    doctor = daily.cli("doctor", "--json")
    report = json.loads(doctor.stdout)
    assert report["ok"] == (doctor.returncode == 0)
    assert {c["level"] for c in report["checks"]} <= {"ok", "WARN", "FAIL"}
    assert "scheduler socket" in {c["check"] for c in report["checks"]}
