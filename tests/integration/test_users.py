"""Several Unix users on one server: each job runs as its submitter; identity comes from the
socket (SO_PEERCRED). Needs root to create the users; skipped otherwise, with the reason."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.client import ApiClient
from jobs.api import ApiError
from jobs.states import JobState
from tests.helpers.stack import Stack
from tests.helpers.users import as_user, needs_users

pytestmark = needs_users


@pytest.fixture
def multi_stack(make_stack: Callable[..., Stack], shared_dir: Path) -> Stack:
    stack = make_stack(scheduler={"socket": shared_dir / "gpulab.sock"})
    stack.start_scheduler()
    stack.start_worker()
    return stack


def test_job_runs_as_its_submitter_and_its_files_are_theirs(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    alice = users["gpulab-alice"]
    workdir = shared_dir / "alice-work"
    workdir.mkdir()
    os.chown(workdir, alice.pw_uid, alice.pw_gid)
    client = ApiClient(shared_dir / "gpulab.sock")
    spec = {"command": ["id", "-u"], "cwd": str(workdir), "mem_bytes": 2**30, "env": {"PATH": "/usr/bin:/bin"}}
    answer = as_user(alice, lambda: client.submit(spec))
    job_id = int(answer["ok"])
    done = multi_stack.wait_state(job_id, JobState.COMPLETED)
    assert (done.user, done.uid) == ("gpulab-alice", alice.pw_uid)
    log = Path(done.log_path)
    assert log.read_text().strip() == str(alice.pw_uid)
    assert (log.stat().st_uid, log.stat().st_mode & 0o777) == (alice.pw_uid, 0o600)


def test_root_job_still_runs_as_root(multi_stack: Stack) -> None:
    job_id = multi_stack.submit("--mem", "1GiB", "--", "id", "-u")
    done = multi_stack.wait_state(job_id, JobState.COMPLETED)
    assert Path(done.log_path).read_text().strip() == "0"


def _try(action: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap an API call so a refusal comes back from `as_user` as its status and message."""

    def run() -> Any:
        try:
            return action()
        except ApiError as exc:
            return {"status": exc.status, "message": exc.message}

    return run


def test_only_the_owner_or_an_admin_may_act_on_a_job_or_read_it(
    multi_stack: Stack, users: dict[str, pwd.struct_passwd], shared_dir: Path
) -> None:
    alice, bob = users["gpulab-alice"], users["gpulab-bob"]
    client = ApiClient(shared_dir / "gpulab.sock")
    spec = {
        "command": ["echo", "alice-private-arg"],
        "cwd": str(shared_dir),
        "mem_bytes": 2**30,
        "hold": True,
        "env": {"PATH": "/usr/bin:/bin", "ALICE_TOKEN": "s3cret"},
    }
    job_id = int(as_user(alice, lambda: client.submit(spec))["ok"])
    second = int(as_user(alice, lambda: client.submit(spec))["ok"])

    for verb in ("cancel", "hold", "release"):
        refused = as_user(bob, _try(lambda v=verb: client.action(job_id, v)))["ok"]  # type: ignore[misc]
        assert refused["status"] == 403
        assert refused["message"] == (f"job {job_id} belongs to gpulab-alice; only its owner or an admin may {verb} it")
    assert as_user(bob, _try(lambda: client.log(job_id, 0)))["ok"]["status"] == 403
    assert multi_stack.store.get(job_id).state == JobState.HELD  # type: ignore[union-attr]
    seen_by_bob = as_user(bob, lambda: client.job(job_id))["ok"]
    assert seen_by_bob["spec"]["command"] == ["(hidden)"] and seen_by_bob["spec"]["env"] == []
    queue = as_user(bob, lambda: client.jobs())["ok"]
    assert [j["spec"]["command"] for j in queue if j["id"] == job_id] == [["(hidden)"]]
    assert "s3cret" not in json.dumps(seen_by_bob) + json.dumps(queue)

    seen_by_alice = as_user(alice, lambda: client.job(job_id))["ok"]
    assert seen_by_alice["spec"]["command"] == ["echo", "alice-private-arg"]
    assert seen_by_alice["spec"]["env"] == ["ALICE_TOKEN", "PATH"]  # names only, never values
    assert as_user(alice, lambda: client.action(job_id, "release"))["ok"]["state"] == "PENDING"
    multi_stack.wait_state(job_id, JobState.COMPLETED)
    assert "alice-private-arg" in as_user(alice, lambda: client.log(job_id, 0))["ok"]["data"]
    assert as_user(bob, _try(lambda: client.log(job_id, 0)))["ok"]["status"] == 403

    # root is an admin: it may cancel anyone's job and read everything; the history says who.
    assert client.job(second)["spec"]["command"] == ["echo", "alice-private-arg"]
    assert client.action(second, "cancel")["state"] == "CANCELLED"
    details = [e.get("detail", "") for e in multi_stack.store.history(second)]
    assert "submitted by gpulab-alice" in details and "cancelled by root" in details
    details = [e.get("detail", "") for e in multi_stack.store.history(job_id)]
    assert "released by gpulab-alice" in details
