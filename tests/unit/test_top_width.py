"""`gpulab top` fits an 80-column terminal: rendered by rich at width 80, no line is longer,
and what a reader needs (every GPU's numbers, the memory bar, job ids) is not cut."""

from __future__ import annotations

import time

from rich.console import Console

from cli.top import frame

GiB = 2**30


def _render(width: int) -> list[str]:
    now = time.time()
    gpu = {
        "name": "NVIDIA A100-SXM4-80GB", "total_bytes": 80 * GiB, "gpulab_reserved_bytes": 40 * GiB,
        "gpulab_used_bytes": 30 * GiB, "others_used_bytes": 10 * GiB, "available_bytes": 30 * GiB, "jobs": 3,
    }  # fmt: skip
    nodes = [
        {"name": "gpu-server-01", "online": True, "draining": True, "gpus": [{**gpu, "index": i} for i in range(2)]}
    ]
    running = {
        "id": 123456, "name": "a-long-experiment-name-for-a-sweep", "user": "alice-with-a-long-name",
        "state": "RUNNING", "node": "gpu-server-01", "gpus": [{"index": 0}, {"index": 1}],
        "current_bytes": {"a": 20 * GiB}, "peak_bytes": {"a": 30 * GiB}, "started_at": now - 3600,
        "submitted_at": now - 7200, "reason": "", "detail": "",
    }  # fmt: skip
    pending = {
        "id": 123457, "name": "pending-one", "user": "bob", "state": "PENDING", "node": "", "gpus": [],
        "submitted_at": now - 100, "reason": "Resources", "detail": "waiting for 24 GiB on one GPU",
        "priority": {"total": 10},
    }  # fmt: skip
    console = Console(width=width, record=True, color_system=None)
    console.print(frame({"nodes": nodes}, [running, pending], now, width=console.width))
    return console.export_text().splitlines()


def test_top_fits_80_columns_without_cutting_numbers() -> None:
    lines = _render(80)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    gpu_rows = [line for line in lines if "█" in line and "GiB" in line]
    assert len(gpu_rows) == 2
    for row in gpu_rows:  # gpulab, others, free, available: whole
        assert "40.0GiB" in row and "10.0GiB" in row and row.count("30.0GiB") == 2, row
    assert "123456" in text and "123457" in text and "20.0GiB/30.0GiB" in text


def test_top_uses_a_wide_terminal() -> None:
    text = "\n".join(_render(160))
    assert "NVIDIA A100-SXM4-80GB" in text and "a-long-experiment-name-for-a-sweep" in text
