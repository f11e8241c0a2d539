"""A SIGTERM'd scheduler exits in bounded time whatever its notifier is doing: a send stuck
on a receiver is abandoned (its delivery is due again for the next notifier), never waited
for. Its pools' threads once were concurrent.futures', which the interpreter joins at exit:
a mail on an SMTP server that trickles its greeting kept a stopped scheduler alive."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import redis

from scheduler.redis_server import RedisServer
from tests.helpers.stack import WAIT_S, Stack, free_port, test_config


@contextlib.contextmanager
def trickling_smtp() -> Iterator[tuple[int, threading.Event]]:
    """A server that greets one byte at a time, never ending the line: every read of the
    client's gets a byte before its timeout, so no timeout ever ends the conversation."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    connected, closing = threading.Event(), threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            connected.set()
            with conn:
                while not closing.wait(0.5):  # the pace of the trickle, not a synchronisation
                    conn.sendall(b"2")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, connected
    finally:
        closing.set()
        listener.close()


def test_a_mail_stuck_on_the_smtp_server_does_not_hold_the_scheduler_stop(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    with trickling_smtp() as (port, connected):
        notify = {"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_timeout_s": 5.0}
        stack = Stack(tmp_path, redis_server.url, redis_client, test_config(notify=notify))
        try:
            scheduler = stack.start_scheduler()
            stack.start_worker()
            stack.submit("--mail", "alice@example.org", "--", sys.executable, "-c", "pass")
            assert connected.wait(WAIT_S), "the notifier never connected to the SMTP server"
            scheduler.proc.send_signal(signal.SIGTERM)
            try:
                assert scheduler.proc.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                scheduler.stop()  # its threads' stacks into the failure (SIGUSR1), then killed
                raise
        finally:
            stack.stop()
