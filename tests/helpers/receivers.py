"""Real local receivers for notification tests: an HTTP server in a thread that records every
POST (and can be told to fail, hang or redirect), and an aiosmtpd SMTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Records POSTs. `answer(post) -> (status, extra headers, seconds to stall first)` decides
    each answer; the default is 200 at once."""

    port: int = 0
    posts: list[Post] = field(default_factory=list)
    answer: Callable[[Post], tuple[int, dict[str, str], float]] = lambda _post: (200, {}, 0.0)
    _server: ThreadingHTTPServer | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                post = Post(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver._changed:
                    receiver.posts.append(post)
                    receiver._changed.notify_all()
                status, headers, stall = receiver.answer(post)
                if stall:
                    time.sleep(stall)  # a receiver that hangs: the behaviour under test, not a wait
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Every event received (duplicates included), optionally of one job."""
        with self._changed:
            posts = list(self.posts)
        out = []
        for post in posts:
            for event in post.json["events"]:
                if job_id is None or event["job"]["id"] == job_id:
                    out.append(event)
        return out

    def unique_ids(self, job_ids: set[int]) -> set[str]:
        """Delivery ids received for these jobs, deduplicated as a receiver should."""
        return {e["id"] for e in self.events() if e["job"]["id"] in job_ids}


class _Handler:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


class SmtpReceiver:
    """A real SMTP server (aiosmtpd) on a free local port, recording what it accepts."""

    def __init__(self, port: int) -> None:
        self._handler = _Handler()
        self.controller = Controller(self._handler, hostname="127.0.0.1", port=port)
        self.port = port

    def start(self) -> SmtpReceiver:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def messages_to(self, address: str) -> list[Message]:
        with self._handler.lock:
            return [m for rcpts, m in self._handler.messages if address in rcpts]
