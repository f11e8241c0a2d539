"""A thread pool whose threads never hold up the process's exit.

concurrent.futures.ThreadPoolExecutor joins its threads when the interpreter exits (they are
not daemon threads, and it registers a join at exit), so a send stuck on a receiver kept a
stopped scheduler alive: an SMTP server that trickles its greeting one byte at a time never
lets a read time out (tests/integration/test_scheduler_stop.py). The notifier's sends and the
webhook guard's DNS lookups run here instead, on daemon threads: a stop abandons them, and
what they had claimed is due again (Notifier.close, the claim lease).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_Work = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...]]


class DaemonPool:
    """`submit` and `shutdown` as ThreadPoolExecutor has them, at most `max_workers` threads,
    each started when work finds no idle one."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self.max_workers = max(1, max_workers)
        self.prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shut = False

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.put((future, fn, args))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._run, name=f"{self.prefix}_{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return future

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """No new work; with `cancel_futures`, work not yet started is cancelled. Never waits
        for work under way (`wait` is accepted for ThreadPoolExecutor's signature only)."""
        with self._lock:
            self._shut = True
            threads = len(self._threads)
        while cancel_futures:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(threads):
            self._work.put(None)  # each thread ends once it has nothing to do

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # the future carries it, as ThreadPoolExecutor's does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args
            self._idle.release()
