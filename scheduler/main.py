"""`gpulab scheduler`: the API server and the scheduling loop in one process.

Any number of them may share one Redis: each serves the API on its own socket, and the one
holding the leader lease (scheduler/leader.py) runs the loop.

It holds `<state_dir>/scheduler.lock` for its whole life: a second scheduler on the same
state directory says so and exits 1, and never touches the running one's socket.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

from jobs.config import Config
from jobs.daemons import Presence
from jobs.redis_conn import connect_redis, redact
from scheduler.api_server import ApiServer, SocketInUse
from scheduler.daemon import Scheduler
from scheduler.instance import AlreadyRunning, LockUnavailable, private_dir, refusal, scheduler_lock
from scheduler.leader import Leadership, holder_name
from scheduler.notify.notifier import start_notifier
from scheduler.service import SchedulerService
from scheduler.web import start_web

log = logging.getLogger("gpulab.scheduler")


def run_scheduler(config: Config) -> int:
    try:
        private_dir(config.state_dir)
        if config.socket_path.parent != config.state_dir:
            private_dir(config.socket_path.parent)
        lock = scheduler_lock(config.state_dir).acquire()
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
        lock.release()


def _serve(config: Config) -> int:
    client = connect_redis(config.effective_redis_url, "scheduler", config.redis_password())
    presence = Presence(client, "scheduler", socket.gethostname())
    presence.check_in(first=True)  # VersionMismatch: another version is live on this Redis
    stop = threading.Event()
    presence.start(stop)
    server = ApiServer(config.socket_path, SchedulerService(config, client))
    start_web(config, server.service)
    api_thread = threading.Thread(target=server.serve_forever, name="api", daemon=True)
    api_thread.start()
    notifier = start_notifier(config, client, stop)  # its own threads: the loop never waits on a receiver

    def _stop(signum: int, _frame: object) -> None:
        log.info("scheduler: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(
        f"gpulab scheduler ready: socket {config.socket_path}, redis {redact(config.effective_redis_url)}", flush=True
    )
    leader = Leadership(client, config.scheduler.leader_lease_s, holder_name(config.socket_path))
    leader_thread = leader.start(stop)
    try:
        Scheduler(config, client, leader).run_forever(stop)
    finally:
        stop.set()
        leader_thread.join(timeout=5)  # frees the lease: a successor takes over at once
        if notifier is not None:
            notifier.close()  # deliveries it was sending are due again at once
        server.shutdown()
        server.server_close()
        server.remove_socket()  # ours only: while we held the lock no one else could bind it
        presence.leave()
    return 0


if __name__ == "__main__":
    from jobs.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(run_scheduler(load_config()))
