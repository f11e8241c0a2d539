"""Profiles are their owner's: the scheduler's service (on a real redis-server) keys them by the
caller's identity, refuses another user's listing to non-admins, and never takes a key, a
request origin or an estimate for another kind of job from the client."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.api import ApiError
from jobs.config import Config
from jobs.lifecycle import Fence
from jobs.profiles import Sample
from jobs.sizes import GiB
from jobs.spec import JobSpec
from scheduler.service import Caller, SchedulerService


def test_profiles_are_keyed_by_the_caller_and_private(redis_client: redis.Redis, tmp_path: Path) -> None:
    service = SchedulerService(Config(state_dir=tmp_path), redis_client)
    alice, bob = Caller(1001, "alice", 1), Caller(1002, "bob", 2)
    spec = JobSpec(command=("python", "train.py", "--batch-size", "64"), cwd="/home/shared/proj")
    alice_key = service.submitter.memory.key(spec, "alice").digest
    assert alice_key != service.submitter.memory.key(spec, "bob").digest
    redis_client.set("fence", "t")
    for n in range(3):
        service.store.add_profile_sample(
            "alice", Sample(n, 1, 8 * GiB, float(n), label="x"), alice_key, Fence("fence", "t"),
            window=20, max_profiles=10, ttl_s=60,
        )  # fmt: skip
    # Alice's preview learns from her runs; the same command under bob's name learns nothing.
    body = {**spec.to_json(), "mem_auto": True}
    assert service.preview_memory(alice, body)["mem_bytes"] is not None
    assert service.preview_memory(bob, body)["mem_bytes"] is None
    # A client cannot name a profile key or a request origin: they are not spec fields.
    with pytest.raises(ApiError) as refused:
        service.preview_memory(bob, {**body, "profile_key": alice_key})
    assert refused.value.status == 400
    assert [p["profile_key"] for p in service.profiles(alice, "")["profiles"]] == [alice_key]
    assert service.profiles(bob, "")["profiles"] == []
    with pytest.raises(ApiError) as denied:
        service.profiles(bob, "alice")
    assert denied.value.status == 403
    assert service.profiles(Caller(0, "root", 3), "alice")["profiles"]  # admins may look
    # An estimate counts only for the built-in loop: a plain command's claim is ignored.
    claimed = service.submitter.memory.resolve(JobSpec(command=("x",), cwd="/", mem_estimate=GiB), "bob")
    assert claimed.spec.mem_bytes is None
