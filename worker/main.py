"""`gpulab worker`: one per GPU host."""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import logging
import signal
import socket
import sys
import time

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer

from jobs import keys
from jobs.config import Config
from jobs.daemons import LastWords, Presence
from jobs.redis_conn import connect_redis
from jobs.sizes import format_size
from worker import tasks
from worker.daemon import WorkerDaemon, stop_words
from worker.probe import GpuProbe

log = logging.getLogger("gpulab.worker")


def make_probe(config: Config, node: str, sim_gpus: list[int] | None) -> tuple[GpuProbe, bool]:
    if sim_gpus:
        from worker.sim_probe import SimProbe

        return SimProbe(node, sim_gpus, config.sim_dir), True
    from worker.nvml_probe import NvmlProbe

    return NvmlProbe(), False


def run_worker(config: Config, name: str | None = None, sim_gpus: list[int] | None = None) -> int:
    node = name or config.worker.name or socket.gethostname().split(".")[0]
    if sim_gpus is None and config.worker.simulate_gpus:
        from worker.sim_probe import parse_sim_gpus

        sim_gpus = parse_sim_gpus(list(config.worker.simulate_gpus))
    who = f"worker {node}"
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to stderr
    # A call stuck on a dead connection (a Sentinel failover, a cut network) must fail well
    # before the job leases it renews would lapse: a quarter of the lease, then a retry.
    call_timeout = max(2.0, config.worker.lease_ttl_s / 4)  # above its 1 s BLPOP
    client = connect_redis(config.effective_redis_url, who, config.redis_password(), call_timeout)
    # RQ gets a client of its own: RQ raises its connection pool's socket timeout to its
    # dequeue timeout (415 s), and on a shared pool every heartbeat after a failover could
    # then wait that long on a connection to the old primary.
    rq_client = connect_redis(config.effective_redis_url, who, config.redis_password())
    presence = Presence(client, "worker", node)
    presence.check_in(first=True)  # VersionMismatch: another version is live on this Redis
    try:
        probe, simulated = make_probe(config, node, sim_gpus)  # GpuProbeError: no NVML here
        daemon = WorkerDaemon(config, client, probe, node, simulated=simulated)
        daemon.start()  # NodeNameTaken: a live worker has this name
    except BaseException:  # not a live worker after all: say so now, not in 10 s
        stop_words().say([presence.leave])
        raise
    presence.start(daemon.stopping)
    tasks.CURRENT = daemon
    queue = Queue(keys.node_queue_name(node), connection=rq_client, serializer=JSONSerializer)
    gpus = ", ".join(f"GPU{d.index} {format_size(d.total_bytes)}" for d in probe.snapshot().devices)
    # Until RQ's loop installs its own handlers (after its start-up talks to Redis, which may
    # hang), a SIGTERM would kill the worker outright (exit -15, nothing shut down).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_rq)
    print(f"gpulab worker ready: node {node}{' (simulated)' if simulated else ''}: {gpus}", flush=True)
    last_words = stop_words()  # one stop: RQ's deregistration, the daemon's, the presence
    try:
        _take_launches(queue, rq_client, f"gpulab-{node}-{daemon.owner}", last_words)
    finally:
        daemon.shutdown(last_words)
        last_words.say([presence.leave])  # else it expires
    return 0


class LaunchWorker(SimpleWorker):
    """RQ's in-process worker, with its command channel polled every second. RQ listens on it
    in a redis-py thread that waits up to 60 s for a message; since redis-py 8.2 RQ's
    teardown joins that thread, so a worker told to stop could hang for a minute (found by
    the suite: one stop in ~60 took 60 s)."""

    PUBSUB_POLL_S = 1.0
    last_words: LastWords  # set by _rq_loops

    def subscribe(self) -> None:
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=self.PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def teardown(self) -> None:
        """RQ's own deregistration, bounded: cut off from Redis it waited on RQ's client, whose
        socket timeout RQ raises to 415 s, and RQ ignores a second SIGTERM within a second, so
        a stopped worker hung there before stopping its jobs. What it could not say expires by
        itself (RQ's worker key has a TTL; RQ prunes `rq:workers` of dead names). A loop that
        quit on an error (it restarts) does not speak for the stop's later steps."""
        stopping = self._shutdown_requested_date is not None
        if not (self.last_words if stopping else stop_words()).say([super().teardown]):
            log.warning("worker: RQ could not deregister (Redis did not answer); its entry expires")


def _stop_before_rq(_signum: int, _frame: object) -> None:
    raise StopRequested()  # what RQ's own handler raises when the worker is idle


def _take_launches(queue: Queue, client: redis.Redis, name: str, last_words: LastWords) -> None:
    """RQ's loop, until a signal stops it. RQ quits its loop on any error it does not expect
    (Redis away during its own bookkeeping, a Sentinel failover): the worker would then stop
    every job and exit. Start a new loop instead (a new RQ worker name: the old one may not
    have been able to deregister)."""
    with contextlib.suppress(StopRequested):  # a stop before RQ's handlers were installed
        _rq_loops(queue, client, name, last_words)


def _rq_loops(queue: Queue, client: redis.Redis, name: str, last_words: LastWords) -> None:
    for restart in itertools.count():
        try:
            rq_worker = LaunchWorker(
                [queue], connection=client, serializer=JSONSerializer, name=name + (f"-{restart}" if restart else "")
            )
        except redis.RedisError as exc:  # RQ's constructor talks to Redis, which may still be away
            log.warning("worker: cannot start RQ's loop yet (%s); retrying", exc)
        else:
            rq_worker.last_words = last_words
            with contextlib.suppress(redis.RedisError):  # its teardown could not reach Redis either
                rq_worker.work(logging_level="WARNING", with_scheduler=False)
            if rq_worker._shutdown_requested_date is not None:  # SIGTERM / SIGINT (RQ sets it on either)
                return
            log.warning("worker: RQ's loop ended without a stop request; taking launches again")
        time.sleep(min(2.0, 0.5 * (restart + 1)))  # RQ's handlers, or ours, stay installed


if __name__ == "__main__":
    from jobs.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(run_worker(load_config()))
