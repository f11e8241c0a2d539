"""Pure parts of the ops commands: --since parsing, memory bars, status-page escaping."""

from __future__ import annotations

from datetime import datetime

import click
import pytest
from rich.console import Console

from cli.ops import history_row, parse_since
from cli.top import memory_bar
from scheduler.status_page import _job_cells, _table, gpu_rows


def test_parse_since() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("1d", now=100_000.0) == 100_000.0 - 86400
    assert parse_since("2026-11-27") == datetime(2026, 11, 27).timestamp()
    with pytest.raises(click.BadParameter):
        parse_since("last tuesday")


def test_memory_bar_splits_gpulab_others_free() -> None:
    bar = memory_bar(total=100, gpulab=50, others=20, width=10)
    assert bar.plain == "█████▓▓░░░"
    console = Console(no_color=True, width=40)
    with console.capture() as captured:
        console.print(bar)
    assert captured.get().strip() == "█████▓▓░░░"


def test_status_page_escapes_user_strings() -> None:
    job = {"id": 1, "name": "<script>x</script>", "user": "a&b"}
    html = _table(("ID", "Name", "User", "Why"), [_job_cells(job, "<why>")], "none")
    assert "<script>" not in html and "&lt;script&gt;" in html and "a&amp;b" in html and "&lt;why&gt;" in html
    node = {"name": "<n>", "online": False, "gpus": []}
    assert gpu_rows([node])[0][0] == "&lt;n&gt;"


def test_history_row_of_a_job_that_never_started() -> None:
    job = {
        "id": 7, "name": "x", "user": "u", "node": "", "gpus": [], "submitted_at": 1.0, "started_at": None,
        "ended_at": 2.0, "peak_bytes": {}, "spec": {"mem_bytes": None}, "state": "CANCELLED",
        "reason": "Cancelled", "exit_code": None,
    }  # fmt: skip
    row = history_row(job)
    fields = (row["placement"], row["started"], row["wall"], row["request"], row["exit_code"])
    assert fields == ("-", "-", "-", "whole", "")
