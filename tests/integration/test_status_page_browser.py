"""The status page shows each job's request and each waiting job's priority parts, in the
order the scheduler considers them: over HTTP, and as a browser renders it (headless Chromium
through Playwright, where both are installed; `scripts/test` installs Chromium)."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
import redis

from jobs.states import JobState
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Stack, free_port, release, test_config
from tests.integration.test_ops import get

PRIORITY = re.compile(r"^\d+ = \d+ \+ \d+ \+ \d+$")


@pytest.fixture(scope="module")
def page_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[tuple[Stack, int]]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    port = free_port()
    stack = Stack(
        tmp_path_factory.mktemp("page"), redis_server.url, client, test_config(scheduler={"metrics_port": port})
    )
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifo = stack.fifo("runner")
    runner = stack.submit("--mem", "2GiB", "--name", "runner", *stack.hold_job_args("1GiB", fifo))
    stack.wait_state(runner, JobState.RUNNING)
    for name, prio in (("low", "0"), ("high", "3")):
        stack.submit("--mem", "3GiB", "--name", f"waiting-{name}", "--priority", prio, "--after", str(runner),
                     "--", sys.executable, "-c", "pass")  # fmt: skip
    yield stack, port
    release(fifo)
    stack.stop()
    client.close()


class _Rows(HTMLParser):
    """Every table row's cell texts, by section (the h2 above the table)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self._section, self._in, self._row, self._text = "", "", [], ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h2", "td", "th"):
            self._in, self._text = tag, ""
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._section = self._text.strip()
        elif tag in ("td", "th"):
            self._row.append(self._text.strip())
        elif tag == "tr":
            self.rows.setdefault(self._section, []).append(self._row)
        self._in = ""

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data


def _check(rows: dict[str, list[list[str]]]) -> None:
    head, *queue = rows["Queue"]
    assert "Request" in head and any(h.startswith("Priority") for h in head), head
    request, prio = head.index("Request"), next(i for i, h in enumerate(head) if h.startswith("Priority"))
    names = [r[1] for r in queue]
    assert names == ["waiting-high", "waiting-low"], names  # the order the scheduler considers them
    for row in queue:
        assert row[request] == "1 x 3.0GiB" and PRIORITY.match(row[prio]), row
    running_head, *running = rows["Running"]
    assert running[0][running_head.index("Request")] == "1 x 2.0GiB"


def test_status_page_shows_request_and_priority(page_stack: tuple[Stack, int]) -> None:
    _stack, port = page_stack
    status, html = get(port, "/")
    assert status == 200
    parser = _Rows()
    parser.feed(html)
    _check(parser.rows)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_status_page_in_playwright_chromium(page_stack: tuple[Stack, int]) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if _chromium() is None:
        pytest.skip("no chromium on PATH (scripts/test installs it)")
    _stack, port = page_stack
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            rows: dict[str, list[list[str]]] = {}
            for section in ("Running", "Queue"):
                table = page.locator(f"h2:text-is('{section}') + table")
                rows[section] = [
                    [c.strip() for c in tr.locator("th, td").all_inner_texts()] for tr in table.locator("tr").all()
                ]
        finally:
            browser.close()
    _check(rows)
