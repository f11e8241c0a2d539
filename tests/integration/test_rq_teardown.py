"""The worker's RQ loop stops promptly when told to. Since redis-py 8.2, RQ's teardown joins
its command-channel listener thread, which waits up to its poll interval for a message once
it has read the UNSUBSCRIBE reply; with RQ's 60 s interval, one worker stop in ~60 hung for a
minute (every test that stopped a worker could time out)."""

from __future__ import annotations

import threading

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from tests.helpers.stack import eventually
from worker.main import LaunchWorker


def test_the_listener_thread_ends_once_unsubscribed_even_when_it_read_the_reply_first(
    redis_client: redis.Redis,
) -> None:
    queue = Queue("teardown-test", connection=redis_client, serializer=JSONSerializer)
    rq_worker = LaunchWorker([queue], connection=redis_client, serializer=JSONSerializer, name="teardown-test")
    rq_worker.subscribe()
    thread = rq_worker.pubsub_thread
    assert thread is not None and rq_worker.pubsub is not None
    # The losing order of the race, made certain: the listener reads the UNSUBSCRIBE reply
    # (and goes back to waiting for a subscription) before the thread is told to stop.
    rq_worker.pubsub.unsubscribe()
    eventually(lambda: not rq_worker.pubsub.subscribed)
    # RQ's teardown: stop() (which joins the thread on redis-py >= 8.2), from another thread
    # here so that a hang shows as a thread still alive, not as a test that never ends.
    threading.Thread(target=thread.stop, daemon=True).start()
    thread.join(timeout=15)  # RQ's own listener (60 s poll) would still be waiting
    assert not thread.is_alive()
