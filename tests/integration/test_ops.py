"""Operations on a real stack: `gpulab history`, Prometheus metrics, the status page,
`gpulab top --once` and `gpulab doctor`."""

from __future__ import annotations

import csv
import getpass
import http.client
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.states import JobState
from tests.helpers.stack import ROOT, Stack, free_port, release

GiB = 2**30


@pytest.fixture
def web_stack(make_stack: Callable[..., Stack]) -> tuple[Stack, int]:
    port = free_port()
    s = make_stack(scheduler={"metrics_port": port})
    s.env["COLUMNS"] = "200"
    return s, port


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_history_filters_and_formats(stack: Stack) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    ok = stack.submit("--mem", "1GiB", "--name", "fine", "--", sys.executable, "-c", "pass")
    stack.wait_state(ok, JobState.COMPLETED)
    bad = stack.submit("--mem", "1GiB", "--name", "broken", "--", sys.executable, "-c", "raise SystemExit(3)")
    stack.wait_state(bad, JobState.FAILED)

    everything = json.loads(stack.cli("history", "--json", check=True).stdout)["jobs"]
    assert [j["id"] for j in everything] == [bad, ok]  # newest first
    failed = json.loads(stack.cli("history", "--json", "--state", "failed", check=True).stdout)["jobs"]
    assert [(j["id"], j["reason"], j["exit_code"]) for j in failed] == [(bad, "ExitCode", 3)]
    assert json.loads(stack.cli("history", "--json", "--user", "nobody-here").stdout)["jobs"] == []
    assert len(json.loads(stack.cli("history", "--json", "--since", "1h").stdout)["jobs"]) == 2
    assert json.loads(stack.cli("history", "--json", "--since", "2099-01-01").stdout)["jobs"] == []
    assert [j["id"] for j in json.loads(stack.cli("history", "--json", "--limit", "1").stdout)["jobs"]] == [bad]

    rows = list(csv.DictReader(io.StringIO(stack.cli("history", "--csv", check=True).stdout)))
    assert [(r["id"], r["name"], r["state"], r["exit_code"], r["request"]) for r in rows] == [
        (str(bad), "broken", "FAILED", "3", "1.0GiB"),
        (str(ok), "fine", "COMPLETED", "0", "1.0GiB"),
    ]
    assert rows[0]["user"] == getpass.getuser() and rows[0]["placement"] == "n1:0"
    table = stack.cli("history", check=True).stdout
    assert "broken" in table and "FAILED ExitCode exit 3" in table
    bad_since = stack.cli("history", "--since", "yesterday-ish")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
    assert stack.cli("history", "--state", "RUNNING").returncode == 2


def test_metrics_status_page_and_top(web_stack: tuple[Stack, int]) -> None:
    stack, port = web_stack
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    fifo = stack.fifo("job")
    job = stack.submit("--mem", "4GiB", "--name", "net-1", *stack.hold_job_args("2GiB", fifo))
    stack.wait_state(job, JobState.RUNNING)
    held = stack.submit("--hold", "--name", "later", "--", sys.executable, "-c", "pass")
    me = getpass.getuser()

    values = samples(port)
    gpu = (("gpu", "0"), ("model", next(k for k in values if k[0] == "gpulab_gpu_total_bytes")[1][1][1]))
    gpu_labels = tuple(sorted((*gpu, ("node", "n1"), ("uuid", stack.api.gpus()["nodes"][0]["gpus"][0]["uuid"]))))
    assert values[("gpulab_jobs", (("state", "RUNNING"), ("user", me)))] == 1
    assert values[("gpulab_jobs", (("state", "HELD"), ("user", me)))] == 1
    assert values[("gpulab_gpu_total_bytes", gpu_labels)] == 24 * GiB
    assert values[("gpulab_gpu_gpulab_reserved_bytes", gpu_labels)] == 4 * GiB
    assert values[("gpulab_gpu_jobs", gpu_labels)] == 1
    assert values[("gpulab_node_up", (("node", "n1"),))] == 1
    assert values[("gpulab_jobs_started_total", ())] == 1
    assert values[("gpulab_job_wait_seconds_count", ())] == 1
    assert values[("gpulab_scheduler_pass_seconds", ())] >= 0

    status, page = get(port, "/")
    assert status == 200 and 'http-equiv="refresh"' in page
    assert "net-1" in page
    assert "RUNNING" in page and "later" in page and "Held" in page

    frame = stack.cli("top", "--once", check=True).stdout
    assert "net-1" in frame and "n1" in frame and "later" in frame and "█" in frame

    release(fifo, 0)
    stack.wait_state(job, JobState.COMPLETED)
    stack.cli("cancel", str(held), check=True)
    status, page = get(port, "/")
    assert "COMPLETED" in page.split("Recently finished")[1] and "net-1" in page
    values = samples(port)
    assert values[("gpulab_jobs_finished_total", (("reason", ""), ("state", "COMPLETED")))] == 1
    assert values[("gpulab_jobs_finished_total", (("reason", "Cancelled"), ("state", "CANCELLED")))] == 1
    assert get(port, "/nope")[0] == 404
    exposed = get(port, "/metrics")[1]
    dashboard = (ROOT / "contrib" / "grafana" / "gpulab.json").read_text()
    names = set(re.findall(r"^(?:# HELP )?(gpulab_[a-z_]+)", exposed, re.M))  # series, or families with none now
    missing = set(re.findall(r"gpulab_[a-z_]+", dashboard)) - names
    assert not missing, f"the Grafana dashboard uses metrics the scheduler does not expose: {missing}"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (headless-browser check)")
def test_status_page_in_headless_chromium(web_stack: tuple[Stack, int]) -> None:
    stack, port = web_stack
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    job = stack.submit("--mem", "1GiB", "--name", "net-1", "--", sys.executable, "-c", "pass")
    stack.wait_state(job, JobState.COMPLETED)
    chromium = str(shutil.which("chromium"))
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={stack.tmp_path / 'chromium'}",
         "--dump-dom", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "net-1" in dom and "COMPLETED" in dom


def test_doctor(stack: Stack, tmp_path: Path) -> None:
    stack.start_scheduler()
    stack.start_worker("n1", "1x24GiB")
    result = stack.cli("doctor")
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    for needle in ("ok    redis: reachable", "ok    redis appendonly: yes", "ok    redis maxmemory-policy",
                   "ok    clock vs redis", "ok    worker n1", "ok    scheduler socket"):  # fmt: skip
        assert any(line.startswith(needle) for line in lines), (needle, result.stdout)

    stack.env["GPULAB_STATE_DIR"] = str(tmp_path / "elsewhere")  # no scheduler socket there
    result = stack.cli("doctor")
    assert result.returncode == 1 and "FAIL  scheduler socket" in result.stdout
    stack.env["GPULAB_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    result = stack.cli("doctor")
    assert result.returncode == 1 and "FAIL  redis: cannot reach" in result.stdout
