"""`gpulab scheduler`: the API server and the scheduling loop in one process.

Any number of them may share one Redis: each serves the API on its own socket, and the one
holding the leader lease (scheduler/leader.py) runs the loop.

It holds `<state_dir>/scheduler.lock` for its whole life: a second scheduler on the same
state directory says so and exits 1, and never touches the running one's socket.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import socket
import sys
import threading
import time

from jobs.config import Config
from jobs.daemons import Presence, StopSignals, within
from jobs.redis_conn import connect_redis, redact
from scheduler.api_server import ApiServer, SocketInUse
from scheduler.daemon import Scheduler
from scheduler.instance import AlreadyRunning, LockUnavailable, private_dir, refusal, scheduler_lock, socket_lock
from scheduler.leader import Leadership, holder_name
from scheduler.notify.notifier import start_notifier
from scheduler.service import SchedulerService
from scheduler.web import start_web

log = logging.getLogger("gpulab.scheduler")
STOP_BUDGET_S = 6.0  # a stop's goodbyes to Redis take at most this long (then the process exits)


def run_scheduler(config: Config) -> int:
    try:
        private_dir(config.state_dir)
        if config.socket_path.parent != config.state_dir:
            private_dir(config.socket_path.parent)
        lock = scheduler_lock(config.state_dir).acquire()
        try:
            serving = socket_lock(config.socket_path).acquire()
        except BaseException:
            lock.release()
            raise
    except (AlreadyRunning, LockUnavailable) as exc:
        print(refusal(exc), file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        print(f"gpulab: cannot prepare {exc.filename or config.state_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        return _serve(config)
    except SocketInUse as exc:
        print(f"gpulab scheduler: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        serving.release()
        lock.release()


def _serve(config: Config) -> int:
    # `kill -USR1 PID` prints every thread's stack to stderr: a stop or pass that hangs can be
    # seen where it hangs, on a lab's server and in the suite (tests/helpers/stack.py).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    client = connect_redis(config.effective_redis_url, "scheduler", config.redis_password())
    presence = Presence(client, "scheduler", socket.gethostname())
    presence.check_in(first=True)  # VersionMismatch: another version is live on this Redis
    stop = threading.Event()
    presence.start(stop)
    try:
        server = ApiServer(config.socket_path, SchedulerService(config, client))
    except BaseException:  # SocketInUse: not a live scheduler after all, say so now
        stop.set()
        within([presence.leave], STOP_BUDGET_S)
        raise
    start_web(config, server.service)
    api_thread = threading.Thread(target=server.serve_forever, name="api", daemon=True)
    api_thread.start()
    notifier = start_notifier(config, client, stop)  # its own threads: the loop never waits on a receiver

    stops = StopSignals(stop)  # SIGTERM, SIGINT: its handler takes no lock (jobs/daemons.py)
    print(
        f"gpulab scheduler ready: socket {config.socket_path}, redis {redact(config.effective_redis_url)}", flush=True
    )
    leader = Leadership(client, config.scheduler.leader_lease_s, holder_name(config.socket_path))
    leader_thread = leader.start(stop)
    # The loop runs on a thread of its own so that a stop never waits on it: cut off from
    # Redis, a pass (and every goodbye below) waits out its calls' timeouts and retries, and
    # a SIGTERM'd scheduler took 34 s to exit. Exiting mid-pass is safe: every write the loop
    # makes is one atomic script or MULTI, as it must be for kill -9.
    failure: list[BaseException] = []
    loop = threading.Thread(
        target=_run_loop, args=(Scheduler(config, client, leader), stop, failure), name="loop", daemon=True
    )
    loop.start()
    try:
        while not stops.wait(1.0):
            pass
        if stops.received is not None:
            log.info("scheduler: signal %d, stopping", stops.received)
    finally:
        stop.set()
        deadline = time.monotonic() + STOP_BUDGET_S
        loop.join(timeout=STOP_BUDGET_S / 2)
        # What is left to tell Redis, within the budget: the lease (a successor takes over at
        # once; else it lapses by itself), deliveries claimed but not sent (due again at once;
        # else when their claim lapses), and this daemon's presence (else it expires).
        leader_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        epoch = leader.unreleased_epoch()
        if leader_thread.is_alive() and epoch is not None:
            log.warning("leader: could not release the lease (epoch %d, Redis did not answer); it lapses within %gs",
                        epoch, config.scheduler.leader_lease_s)  # fmt: skip
        goodbyes = [presence.leave] + ([notifier.close] if notifier is not None else [])
        if not within(goodbyes, deadline - time.monotonic()):
            log.warning("scheduler: Redis did not answer while stopping; what was left unsaid expires by itself")
        server.shutdown()
        server.server_close()
        server.remove_socket()  # ours only: while we held the lock no one else could bind it
    if failure:
        raise failure[0]
    return 0


def _run_loop(scheduler: Scheduler, stop: threading.Event, failure: list[BaseException]) -> None:
    try:
        scheduler.run_forever(stop)
    except BaseException as exc:  # the main thread re-raises it (the loop ends only on errors it cannot handle)
        failure.append(exc)
    finally:
        stop.set()


if __name__ == "__main__":
    from jobs.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(run_scheduler(load_config()))
