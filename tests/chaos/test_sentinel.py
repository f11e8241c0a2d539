"""Redis failover under a running stack: a real redis-server primary, a replica and three
sentinels; the daemons reach Redis through `redis+sentinel://`; the primary is killed (-9)
while jobs are submitted and one is running. The stack carries on against the promoted
replica: every job whose submit was acknowledged ends COMPLETED, each ran exactly once, the
running job is untouched, and the invariants hold."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs.invariants import violations
from jobs.redis_conn import make_client
from jobs.states import JobState
from jobs.store import JobStore
from tests.helpers.stack import Stack, eventually, free_port, release, test_config

SERVICE = "gpulab"
FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class RedisCluster:
    """Primary + replica + 3 sentinels, each its own redis-server process on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.binary = shutil.which("redis-server") or ""
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, args: list[str]) -> None:
        folder = self.root / name
        folder.mkdir(parents=True)
        log = open(folder / "log", "wb")  # noqa: SIM115  # the child owns it
        self.procs[name] = subprocess.Popen(
            [self.binary, *args], cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start(self) -> None:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        self._start("primary", ["--port", str(self.primary_port), *common])
        of_primary = ["--replicaof", "127.0.0.1", str(self.primary_port)]
        self._start("replica", ["--port", str(self.replica_port), *common, *of_primary])
        for n, port in enumerate(self.sentinel_ports):
            conf = self.root / f"sentinel{n}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            self._start(f"sentinel{n}", [str(conf), "--sentinel"])
        # Failover needs the sentinels to know the replica and each other (hello messages).
        eventually(self._ready, timeout=60, interval=0.2)

    def _ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                info = self.sentinel(port).sentinel_master(SERVICE)
                if info.get("num-slaves", 0) < 1 or info.get("num-other-sentinels", 0) < 2:
                    return False
            replica = redis.Redis(port=self.replica_port).info("replication")
            return replica.get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def primary_port_now(self) -> int | None:
        try:
            addr = self.sentinel(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(SERVICE)
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    if not shutil.which("redis-server"):
        pytest.skip("no redis-server on PATH")
    c = RedisCluster(tmp_path / "redis")
    try:
        c.start()
        yield c
    finally:
        c.stop()  # also when it never became ready: no servers left behind


class Interrupted(Exception):
    pass


def test_an_interrupted_blocking_read_does_not_poison_the_connection(cluster: RedisCluster) -> None:
    """What RQ's SIGTERM handler does to its blocking dequeue: an exception raised in the
    middle of a BLPOP. The connection must be dropped, not reused with the BLPOP still
    pending on the server (redis-py's Sentinel connection kept it: the next command then
    waited behind the BLPOP, or read its reply; jobs/redis_conn.py)."""
    client = make_client(cluster.url)
    other = redis.Redis(port=cluster.primary_port)
    other.set("k", "v")
    main = threading.get_ident()

    def interrupt(_signum: int, _frame: object) -> None:
        raise Interrupted

    def when_blocked() -> None:
        eventually(lambda: any(c.get("cmd") == "blpop" for c in other.client_list()))
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        threading.Thread(target=when_blocked, daemon=True).start()
        with pytest.raises(Interrupted):
            client.blpop(["empty"], timeout=60)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    other.lpush("empty", "x")  # a BLPOP still pending on the server would take it
    assert client.get("k") == b"v"
    assert other.llen("empty") == 1


@pytest.mark.slow
def test_primary_killed_while_jobs_are_submitted_and_running(tmp_path: Path, cluster: RedisCluster) -> None:
    config = test_config(
        # Long enough to ride out the failover (about 2-4 s here): a worker lease that ran out
        # on the promoted replica would cost the running job.
        worker={"lease_ttl_s": 20},
        scheduler={"leader_lease_s": 5},
    )
    client = redis.Redis(port=cluster.primary_port)
    (tmp_path / "stack").mkdir()
    stack = Stack(tmp_path / "stack", cluster.url, client, config_text=config)
    try:
        stack.start_scheduler()
        stack.start_worker("n1", "2x24GiB")
        fifo = stack.fifo("long")
        running = stack.submit("--mem", "1GiB", *stack.hold_job_args("1GiB", fifo))
        stack.wait_state(running, JobState.RUNNING)

        acked: list[int] = []
        failover_done = threading.Event()
        after_failover: list[int] = []

        runs = tmp_path / "runs"  # each run of a job appends its id: exactly once each
        record_run = f"import os; f = os.open({str(runs)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
        record_run += "os.write(f, (os.environ['GPULAB_JOB_ID'] + '\\n').encode())"

        def submit_until_enough() -> None:
            while len(after_failover) < 5:
                result = stack.cli("submit", "--mem", "1GiB", "--", sys.executable, "-c", record_run)
                if result.returncode == 0:  # refused ones (Redis away) were never acknowledged
                    acked.append(int(result.stdout.strip()))
                    if failover_done.is_set():
                        after_failover.append(acked[-1])

        submitter = threading.Thread(target=submit_until_enough)
        submitter.start()
        eventually(lambda: len(acked) >= 3)
        cluster.kill("primary")
        eventually(lambda: cluster.primary_port_now() == cluster.replica_port, interval=0.1)
        failover_done.set()
        submitter.join(timeout=240)
        assert not submitter.is_alive()

        promoted = redis.Redis(port=cluster.replica_port)
        stack.redis, stack.store = promoted, JobStore(promoted)
        for job_id in acked:
            record = stack.wait_state(job_id, *FINAL)
            assert record.state == JobState.COMPLETED, record
        # Each acknowledged job ran once (an attempt its worker could not start never ran); a
        # submit whose reply was lost in the failover may have stored a job too: once as well.
        ran = Counter(int(line) for line in runs.read_text().split())
        assert set(acked) <= set(ran) and set(ran.values()) == {1}, (acked, ran)
        record = stack.store.get(running)
        assert record is not None and (record.state, record.attempt) == (JobState.RUNNING, 1)
        release(fifo, 0)
        assert stack.wait_state(running, *FINAL).state == JobState.COMPLETED
        assert violations(promoted) == []
    except BaseException:
        for daemon in stack.daemons:  # what a failure needs first
            print(f"--- {daemon.proc.args}", *daemon.lines[-150:], sep="\n")
        raise
    finally:
        stack.stop()
