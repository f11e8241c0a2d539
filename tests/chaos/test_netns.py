"""Issue 15: a real network partition between a daemon and Redis, where root is available.

The daemon runs in a network namespace of its own (`ip netns exec`), joined to the host by a
veth pair; the test's private redis-server listens on 127.0.0.1 and the host end of the pair.
Taking the host end down cuts the namespace off: its packets are dropped, so its open TCP
connections to Redis stall (no reset, no error) until the link comes back up, and new ones
fail once ARP gives up ("No route to host"), as when a switch or a cable fails. Whatever the
cut-off daemon then sends late must be fenced:

- a leader cut off is replaced once its lease runs out, and when the link is back it steps
  down (its epoch ended) without a write of its loop taking effect: every job ran once;
- a worker cut off while running a job has the job killed by its shim before the lease runs
  out; the job is requeued and runs on another node, never beside its first copy; the cut-off
  worker sees its heartbeat fail (a stalled connection times out), and its late report of the
  first copy's end is refused.

Skipped unless root and `ip netns add` works.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs import keys
from jobs.invariants import violations
from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import Stack, eventually, free_port, test_config

LEADS = "this scheduler leads now"
LEASE = {"leader_lease_s": 1.5}  # as tests/integration/test_leader.py: failover in seconds
FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
STOP_S = 30.0  # a daemon that has not exited this long after SIGTERM at teardown is killed

_made = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass(frozen=True)
class NetNs:
    """A network namespace joined to the host by a veth pair (host_ip <-> ns_ip, a /30)."""

    name: str
    host_veth: str
    host_ip: str
    ns_ip: str

    @property
    def wrap(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """Drop every packet between the namespace and the host (the peer loses carrier too)."""
        _ip("link", "set", self.host_veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.host_veth, "up")

    def pids(self) -> list[int]:
        found = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in found.stdout.split()] if found.returncode == 0 else []


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh namespace per test. At the end everything still running in it is SIGKILLed
    (a daemon cut off can outlive its SIGTERM), then the veth pair and the namespace go."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) on PATH")
    pid, n = os.getpid(), next(_made)
    # A /30 of 10.128.0.0/13 per (pid, n % 4): concurrent runs of this file never share one.
    base = IPv4Address("10.128.0.0") + ((pid % 32768) * 4 + n % 4) * 4
    ns = NetNs(f"gl-{pid}-{n}", f"glh-{pid}-{n}", str(base + 1), str(base + 2))
    added = _ip("netns", "add", ns.name, check=False)
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` failed: {added.stderr.strip()}")
    peer = f"gln-{pid}-{n}"
    try:
        _ip("link", "add", ns.host_veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_veth)
        _ip("link", "set", ns.host_veth, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", peer)
        _ip("-n", ns.name, "link", "set", peer, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        try:
            for pid_left in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid_left, signal.SIGKILL)
            eventually(lambda: not [p for p in ns.pids() if pid_alive(p)], timeout=30)
        finally:
            _ip("link", "del", ns.host_veth, check=False)  # both ends (an unfinished setup: maybe none)
            _ip("netns", "del", ns.name, check=False)


class NetRedis(RedisServer):
    """The test's own redis-server, as in production (RedisServer), also listening on the
    host end of the veth pair for the daemons inside the namespace."""

    def __init__(self, data_dir: Path, host_ip: str) -> None:
        super().__init__(data_dir, port=free_port())
        self.host_ip = host_ip

    @property
    def ns_url(self) -> str:
        return f"redis://{self.host_ip}:{self.port}/0"

    def command(self) -> list[str]:
        args = super().command()
        at = args.index("--bind")
        args[at + 1 : at + 2] = ["127.0.0.1", self.host_ip]
        return [*args, "--protected-mode", "no"]


@pytest.fixture
def net_redis(tmp_path: Path, netns: NetNs) -> Iterator[NetRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    server = NetRedis(tmp_path / "redis", netns.host_ip)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_stack(tmp_path: Path, netns: NetNs, net_redis: NetRedis) -> Iterator[Callable[..., Stack]]:
    """make_stack(scheduler={...}, worker={...}): a stack on the test's Redis (the test's side
    of it, and its daemons by default, through 127.0.0.1). At the end the link is restored,
    every daemon gets SIGTERM, and SIGKILL if it has not exited after STOP_S (the namespace's
    fixture then kills whatever is left in there); their output is printed (shown on failure)."""
    made: list[Stack] = []

    def make(**sections: Mapping[str, Any]) -> Stack:
        root = tmp_path / f"stack{len(made)}"
        root.mkdir()
        client = redis.Redis.from_url(net_redis.url)
        made.append(Stack(root, net_redis.url, client, config_text=test_config(**sections)))
        return made[-1]

    yield make
    netns.restore()
    daemons = [d for s in made for d in reversed(s.daemons)]
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
    for daemon in daemons:
        try:
            daemon.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            print(f"teardown: {daemon.proc.args!r} ignored SIGTERM for {STOP_S:g}s; killed")
            daemon.proc.kill()
            daemon.proc.wait(timeout=30)
    for daemon in daemons:
        print(f"==== {daemon.proc.args!r} (exit {daemon.proc.returncode})", *daemon.lines[-200:], sep="\n")
    for s in made:
        s.redis.close()


def _completed(stack: Stack, job_id: int) -> None:
    record = stack.wait_state(job_id, *FINAL)
    assert record.state == JobState.COMPLETED, record


@pytest.mark.slow
def test_leader_cut_off_from_redis_is_replaced_and_steps_down_when_back(
    make_stack: Callable[..., Stack], netns: NetNs, net_redis: NetRedis
) -> None:
    inside: Stack = make_stack(scheduler=LEASE)  # its scheduler runs in the namespace
    outside: Stack = make_stack(scheduler=LEASE)
    old = inside.start_scheduler(wrap=netns.wrap, env={"GPULAB_REDIS_URL": net_redis.ns_url})
    old.wait_line(LEADS)
    new = outside.start_scheduler()
    outside.start_worker("n1", "2x24GiB")
    before = [outside.submit("--mem", "1GiB", "--", "true") for _ in range(2)]
    for job_id in before:  # dispatched by the leader in the namespace
        _completed(outside, job_id)
    assert not any(LEADS in line for line in new.lines)
    assert int(outside.redis.get(keys.LEADER_EPOCH)) == 1
    cut_at = len(old.lines)

    netns.cut()
    new.wait_line(LEADS)  # the cut-off leader's lease ran out in Redis; the follower took over
    assert int(outside.redis.get(keys.LEADER_EPOCH)) == 2
    during = [outside.submit("--mem", "1GiB", "--", "true") for _ in range(3)]
    for job_id in during:
        _completed(outside, job_id)
    lease = outside.redis.get(keys.LEADER)

    netns.restore()
    # Back on the network, it learns that its lease is gone and stops leading.
    old.wait_line("epoch 1 ends")
    after_cut = old.lines[cut_at:]
    assert not any(LEADS in line for line in after_cut), after_cut  # it did not lead again
    assert outside.redis.get(keys.LEADER) == lease  # the successor's lease is untouched
    assert int(outside.redis.get(keys.LEADER_EPOCH)) == 2
    for job_id in [*before, *during]:
        outside.assert_ran_once(job_id)
    assert violations(outside.redis) == []

    # The ex-leader is a follower now: a job submitted through its own socket runs once.
    later = inside.submit("--mem", "1GiB", "--", "true")
    _completed(outside, later)
    outside.assert_ran_once(later)
    assert int(outside.redis.get(keys.LEADER_EPOCH)) == 2
    assert violations(outside.redis) == []


@pytest.mark.slow
def test_worker_cut_off_mid_job_loses_it_to_another_node_without_overlap(
    make_stack: Callable[..., Stack], netns: NetNs, net_redis: NetRedis, marker: Marker
) -> None:
    stack: Stack = make_stack(worker={"lease_ttl_s": 5})
    stack.start_scheduler()
    cut_off = stack.start_worker("n1", "1x24GiB", wrap=netns.wrap, env={"GPULAB_REDIS_URL": net_redis.ns_url})
    job = stack.submit("--requeue", "--mem", "1GiB", *marker.job_args())
    stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.node == "n1")
    first = marker.wait_start(job, 1)
    assert first.started_by(cut_off.proc.pid)
    other = stack.start_worker("n2", "1x24GiB")
    # No new job on n1: the requeued copy must go to n2. (n1's heartbeat key outlives the
    # job's lease by the moments between the two writes of its last heartbeat; a pass in
    # between could otherwise hand the copy straight back to the cut-off node.)
    drained = stack.cli("node", "drain", "n1", "--reason", "cut off by the test")
    assert drained.returncode == 0, drained.stderr

    netns.cut()
    cut_off.wait_line(f"job {job} stopped by its shim: no lease renewal")

    def first_copy_gone() -> bytes | None:
        # Read after the copy was seen gone: if n1 still held the lease then, it held it
        # when the copy died (only n1 can renew it, and n1 is cut off).
        return None if pid_alive(first.pid) else (stack.redis.get(keys.lease(job)) or b"-")

    assert eventually(first_copy_gone) == b"n1", "the job outlived its lease on the cut-off node"

    again = stack.wait_for(job, lambda r: r.state == JobState.RUNNING and r.attempt == 2)
    assert again.node == "n2", again
    second = marker.wait_start(job, 2)
    assert second.started_by(other.proc.pid)
    assert second.live == (), f"attempt 2 started while attempt 1 ({first.pid}) was alive"
    assert not pid_alive(first.pid)
    # The cut-off worker itself finds Redis gone: its lease renewal, stalled on a connection
    # that gets no answer, gives up after the client's socket timeout (15 s). (It used to wait
    # 7 min: RQ had raised the timeout of the pool it shared with the daemon's threads.)
    cut_off.wait_line("heartbeat failed")

    netns.restore()
    # n1 reports attempt 1's end (it was stopped, to be requeued) once Redis answers again:
    # refused, the job has moved on.
    cut_off.wait_line(f"job {job} ended but was already moved on")
    now = stack.store.get(job)
    assert now is not None and (now.state, now.attempt, now.node) == (JobState.RUNNING, 2, "n2"), now

    assert marker.release(job, 2)
    done = stack.wait_state(job, *FINAL)
    assert (done.state, done.attempt, done.node) == (JobState.COMPLETED, 2, "n2"), done
    assert [e["state"] for e in stack.store.history(job)].count("RUNNING") == 2
    marker.assert_exactly_once([job])
    assert [s.attempt for s in marker.starts(job)] == [1, 2]
    assert violations(stack.redis) == []
