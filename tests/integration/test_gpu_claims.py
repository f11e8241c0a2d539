"""One worker per physical GPU (worker/daemon.py, `_take_gpus`): two workers on one host under
different node names would each offer the same GPUs, and the scheduler would book each twice.
The workers run in the test's process against the real Redis; their simulated GPUs are made
the same physical ones by giving both probes one simulated host name."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs import keys
from jobs.config import Config, WorkerConfig
from tests.helpers.stack import Stack, eventually
from worker.daemon import GpuTaken, WorkerDaemon
from worker.sim_probe import SimProbe, sim_uuid


def _worker(tmp_path: Path, client: redis.Redis, name: str) -> WorkerDaemon:
    config = Config(state_dir=tmp_path / "state", worker=WorkerConfig(lease_ttl_s=30, kill_grace_s=1))
    probe = SimProbe("one-host", [2**34, 2**34], tmp_path / "sim")  # the same two GPUs for every worker
    return WorkerDaemon(config, client, probe, name, simulated=True)


def test_a_second_worker_on_the_same_gpus_is_refused_and_leaves_no_claim(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    first = _worker(tmp_path, redis_client, "a")
    first._claim_name()
    uuids = sorted(first._gpu_uuids)
    assert len(uuids) == 2
    assert [redis_client.get(keys.gpu_owner(u)) for u in uuids] == [first.gpu_claim.encode()] * 2

    second = _worker(tmp_path, redis_client, "b")
    with pytest.raises(GpuTaken, match=r"served by node 'a'"):
        second._claim_name()
    # Refused whole: none of its GPUs and not its name are held, so it can start once "a" is gone.
    assert [redis_client.get(keys.gpu_owner(u)) for u in uuids] == [first.gpu_claim.encode()] * 2
    assert redis_client.get(keys.node_owner("b")) is None

    first._mark_down()  # "a" stops: its GPUs are free at once
    assert all(redis_client.get(keys.gpu_owner(u)) is None for u in uuids)
    second._claim_name()
    assert [redis_client.get(keys.gpu_owner(u)) for u in uuids] == [second.gpu_claim.encode()] * 2


def test_the_heartbeat_renews_the_claims_and_a_restart_under_the_same_name_takes_them(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    first = _worker(tmp_path, redis_client, "a")
    first._claim_name()
    uuid = first._gpu_uuids[0]
    redis_client.pexpire(keys.gpu_owner(uuid), 1000)
    first.publish_heartbeat()
    assert redis_client.pttl(keys.gpu_owner(uuid)) > 1000  # renewed to the lease's TTL
    # The same node name again (a restart whose predecessor's name claim lapsed): its own GPUs.
    redis_client.delete(keys.node_owner("a"))
    again = _worker(tmp_path, redis_client, "a")
    again._claim_name()
    assert redis_client.get(keys.gpu_owner(uuid)) == again.gpu_claim.encode()


def test_a_worker_whose_gpu_another_worker_took_stops_instead_of_offering_it(stack: Stack) -> None:
    """A worker frozen past its lease whose GPU a worker of another name claimed meanwhile
    must not take it back with its next heartbeat (both would offer it): it stops, like a
    worker whose name was taken, and leaves the claim to the other."""
    worker = stack.start_worker("n1")
    claim = keys.gpu_owner(sim_uuid("n1", 0))
    eventually(lambda: stack.redis.get(claim) is not None)
    stack.redis.set(claim, b"other other-host:1", px=60_000)  # what the other worker's start wrote
    worker.wait_line("is served by another worker now")
    assert worker.proc.wait(timeout=60) == 0
    assert stack.redis.get(claim) == b"other other-host:1"


def test_a_claim_left_without_expiry_is_refused_with_the_key_to_delete(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    """Found by the attack round: a claim key holding garbage and no TTL (written by hand, or a
    restored dump) blocks its GPU for good, and the refusal named only a holder that does not
    exist. It must name the key and say that it never lapses."""
    worker = _worker(tmp_path, redis_client, "a")
    uuid = sorted(d.uuid for d in worker.probe.snapshot().devices)[0]
    redis_client.set(keys.gpu_owner(uuid), "garbage")
    with pytest.raises(GpuTaken) as refused:
        worker._claim_name()
    assert keys.gpu_owner(uuid) in str(refused.value)
    assert "never lapses" in str(refused.value)
    assert redis_client.get(keys.node_owner("a")) is None  # refused whole


def test_a_refused_worker_says_why_in_one_printable_line(stack: Stack) -> None:
    """Break (final attack pass): the refusal quotes the claim's holder as Redis holds it, and
    escape sequences or a newline written there reached the operator's terminal raw."""
    stack.redis.set(keys.gpu_owner(sim_uuid("n1", 0)), "evil\x1b[2J\x07node holder\nnext")
    refused = stack.cli("worker", "--name", "n1", "--sim-gpus", "1x24GiB")
    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and "it never lapses" in lines[0], refused.stderr
    assert "\x1b" not in refused.stderr and "\x07" not in refused.stderr
