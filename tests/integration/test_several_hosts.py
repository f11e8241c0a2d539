"""Several hosts, one experience: a scheduler and two workers, each in its own state
directory ("three hosts" on one machine, sharing only Redis).

- `gpulab logs [-f]` from any host: the job runs on the second node, its log file is on
  that node's disk only, and the CLI talks to the scheduler, whose host has no such file.
- Hostile output (floods, binary, escape sequences, no newlines) is capped and hurts
  neither the worker, Redis nor the other jobs.
- Every daemon publishes its version and clock; one of another version refuses to start
  unless told; `gpulab doctor` shows them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobs import keys, scripts
from jobs.daemons import live_daemons
from jobs.states import JobState
from jobs.version import gpulab_version
from scheduler.redis_server import RedisServer
from tests.helpers.stack import Daemon, Stack, eventually, release, test_config

CAP = 64 * 1024
HEAD = 4 * 1024
LOG_SETTINGS = {
    "log_redis_cap": "64KiB", "log_head": "4KiB", "log_rate": "64KiB", "log_burst": "64KiB",
    "log_retention_s": 3600,
}  # fmt: skip


class Hosts:
    def __init__(self, head: Stack, gpu1: Stack, gpu2: Stack) -> None:
        self.head, self.gpu1, self.gpu2 = head, gpu1, gpu2


@pytest.fixture(scope="module")
def hosts(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    config = test_config(worker=LOG_SETTINGS)
    made = [
        Stack(tmp_path_factory.mktemp(name), redis_server.url, client, config_text=config)
        for name in ("head", "gpu1", "gpu2")
    ]
    head, gpu1, gpu2 = made
    try:
        head.start_scheduler()
        gpu1.start_worker("gpu1", "1x24GiB")
        gpu2.start_worker("gpu2", "1x24GiB")
        yield Hosts(head, gpu1, gpu2)
    finally:
        for stack in reversed(made):
            stack.stop()
        client.close()


def follow(stack: Stack, job_id: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "logs", "-f", *extra, str(job_id)],
        env=stack.env,
        cwd=stack.tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Lines:
    """A stream's lines as they come, awaitable."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait(self, needle: str, timeout: float = 60) -> str:
        with self._changed:
            found = self._changed.wait_for(lambda: any(needle in x for x in self.lines), timeout)
            assert found, f"no line with {needle!r} in {self.lines}"
            return next(x for x in self.lines if needle in x)


def test_logs_follow_a_job_on_the_second_node_from_the_scheduler_host(hosts: Hosts) -> None:
    head, gpu2 = hosts.head, hosts.gpu2
    fifo = head.fifo("second-node")
    job = head.submit("--node", "gpu2", "--mem", "1GiB", *head.hold_job_args("0", fifo))
    follower = follow(head, job)
    out = Lines(follower.stdout)
    out.wait("holding 0 on")  # the job's first line, while it runs, through Redis
    record = head.store.get(job)
    assert record is not None and record.state == JobState.RUNNING and record.node == "gpu2"
    assert (gpu2.state_dir / "logs" / f"{job}.log").exists()
    assert not (head.state_dir / "logs" / f"{job}.log").exists()  # the scheduler's host has no file
    release(fifo, 0)
    assert follower.wait(timeout=60) == 0
    out.wait("released with 0")
    again = head.cli("logs", str(job))
    assert again.returncode == 0 and "holding 0 on" in again.stdout and "released with 0" in again.stdout
    as_json = json.loads(head.cli("logs", "--json", str(job)).stdout)
    assert as_json["state"] == "COMPLETED" and as_json["source"] == "redis"
    assert as_json["data"] == again.stdout and as_json["skipped"] == 0


def test_follow_on_a_held_job_says_what_it_waits_for_then_follows_it(hosts: Hosts) -> None:
    head = hosts.head
    job = head.submit("--hold", "--", sys.executable, "-c", "print('started after release')")
    follower = follow(head, job)
    err, out = Lines(follower.stderr), Lines(follower.stdout)
    line = err.wait(f"job {job} is HELD")
    assert f"gpulab release {job}" in line
    assert follower.poll() is None  # still following
    assert head.cli("release", str(job)).returncode == 0
    out.wait("started after release")
    assert follower.wait(timeout=60) == 0
    assert len([x for x in err.lines if "HELD" in x]) == 1  # one line, not one per poll


def test_follow_on_a_pending_job_names_its_reason(hosts: Hosts) -> None:
    head = hosts.head
    held = head.submit("--hold", "--", "true")
    job = head.submit("--after", str(held), "--", "true")
    head.wait_for(job, lambda r: r.reason == "Dependency")
    follower = follow(head, job, "--json")
    first = json.loads(Lines(follower.stdout).wait('"state": "PENDING"'))
    assert first["reason"] == "Dependency" and first["data"] == ""
    assert head.cli("cancel", str(held)).returncode == 0  # the dependency can never be met: it ends
    assert follower.wait(timeout=60) == 0


@pytest.mark.slow  # floods the node's disk and Redis on purpose
def test_a_flood_of_binary_without_newlines_is_capped_and_keeps_head_and_end(hosts: Hosts) -> None:
    """20 MB of binary garbage and escape sequences, no newlines, as fast as it can: Redis keeps
    at most the cap (the head and the newest bytes), the worker and a neighbour job are fine."""
    head, gpu1 = hosts.head, hosts.gpu1
    flood = (
        "import os, sys\n"
        "w = sys.stdout.buffer\n"
        "w.write(b'HEAD-OF-OUTPUT'); w.flush()\n"
        "chunk = bytes(range(256)) * 64 + b'\\x1b]52;c;cHduZWQ=\\x07\\x1b[6n\\x9b'\n"
        "for _ in range(1200): w.write(chunk)\n"
        "w.write(b'END-OF-OUTPUT'); w.flush()\n"
    )
    job = head.submit("--node", "gpu1", "--mem", "1GiB", "--", sys.executable, "-c", flood)
    fifo = head.fifo("neighbour")
    neighbour = head.submit("--node", "gpu1", "--mem", "1GiB", *head.hold_job_args("0", fifo))
    head.wait_state(job, JobState.COMPLETED)
    meta = head.redis.hgetall(keys.job_log_meta(job))
    assert int(meta[b"end"]) == (gpu1.state_dir / "logs" / f"{job}.log").stat().st_size > 19 * 10**6
    assert int(meta[b"stored"]) <= CAP + 64 * 1024  # the newest entry is never cut
    assert head.redis.memory_usage(keys.job_log(job)) < 3 * CAP
    shown = head.cli_bytes("logs", str(job))  # piped: the job's bytes; gpulab's note on stderr
    assert shown.returncode == 0
    assert shown.stdout.startswith(b"HEAD-OF-OUTPUT") and shown.stdout.endswith(b"END-OF-OUTPUT")
    assert b"of this job's output not kept in Redis" in shown.stderr
    # The neighbour on the same node still gets its output shipped, and the node lives.
    eventually(lambda: "holding 0" in head.cli("logs", str(neighbour)).stdout)
    release(fifo, 0)
    head.wait_state(neighbour, JobState.COMPLETED)
    assert head.redis.exists(keys.node("gpu1"))


@pytest.mark.slow  # floods the node's disk and Redis on purpose
def test_a_job_printing_forever_costs_redis_at_most_the_cap(hosts: Hosts) -> None:
    head = hosts.head
    forever = "import sys\nwhile True: sys.stdout.write('y' * 4095 + '\\n')\n"
    job = head.submit("--node", "gpu2", "--mem", "1GiB", "--", sys.executable, "-c", forever)
    head.wait_state(job, JobState.RUNNING)
    eventually(lambda: int(head.redis.hget(keys.job_log_meta(job), "end") or 0) > 4 * CAP)
    assert int(head.redis.hget(keys.job_log_meta(job), "stored") or 0) <= CAP + 64 * 1024
    follower = follow(head, job)
    Lines(follower.stdout).wait("yyyy")  # a follower sees the newest output at once
    assert head.cli("cancel", str(job)).returncode == 0
    assert follower.wait(timeout=60) == 0
    head.wait_state(job, JobState.CANCELLED)


def test_terminal_escapes_from_a_job_reach_json_escaped_and_raw_only_on_request(hosts: Hosts) -> None:
    head = hosts.head
    nasty = "import sys; sys.stdout.write('a\\x1b]0;pwned\\x07b\\x1b[31mred\\x1b[0m\\x00\\n')"
    job = head.submit("--", sys.executable, "-c", nasty)
    head.wait_state(job, JobState.COMPLETED)
    as_json = json.loads(head.cli("logs", "--json", str(job)).stdout)
    assert as_json["data"] == "a\x1b]0;pwned\x07b\x1b[31mred\x1b[0m\x00\n"
    raw = head.cli("logs", "--raw", str(job))  # piped (not a terminal): the bytes as written
    assert raw.stdout == as_json["data"]


def test_logs_piped_or_raw_are_the_bytes_the_job_wrote(hosts: Hosts) -> None:
    """Break: `logs --raw` (and piped `logs`) printed bytes that are not UTF-8 as U+FFFD: the
    API answered text only. A job's output is its bytes: binary, Latin-1, a character cut at
    the end, a NUL, a terminal escape."""
    head = hosts.head
    written = b"latin-1 \xe9t\xe9 \xff\xfe\x00 \x1b[31mred\x1b[0m euro \xe2\x82\xac cut \xe2\x82"
    job = head.submit("--", sys.executable, "-c", f"import sys; sys.stdout.buffer.write({written!r})")
    head.wait_state(job, JobState.COMPLETED)
    for args in (["--raw"], [], ["-f"]):
        out = head.cli_bytes("logs", *args, str(job))
        assert (out.returncode, out.stdout, out.stderr) == (0, written, b""), args
    as_json = json.loads(head.cli("logs", "--json", str(job)).stdout)
    assert as_json["data"] == written.decode(errors="replace")  # JSON is text


def test_a_job_without_output_reads_as_empty_and_others_cannot_read_it(hosts: Hosts, tmp_path: Path) -> None:
    head = hosts.head
    job = head.submit("--", "true")
    head.wait_state(job, JobState.COMPLETED)
    result = head.cli("logs", str(job))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    bad = head.cli("logs", "--json", "999999")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# ---- versions and doctor -------------------------------------------------------------------------
def fake_daemon(client: redis.Redis, daemon_id: str, **record: object) -> None:
    """A live daemon's record as another gpulab would publish it (older version, skewed clock)."""
    base = {"kind": "worker", "name": "old", "host": "elsewhere", "pid": 1, "version": gpulab_version()}
    script = client.register_script(scripts.DAEMON_CHECKIN)
    assert script(keys=[keys.DAEMONS, keys.DAEMON_INFO], args=[daemon_id, "x", json.dumps(base | record), 60_000, "0"])


def forget_daemon(client: redis.Redis, daemon_id: str) -> None:
    client.zrem(keys.DAEMONS, daemon_id)
    client.hdel(keys.DAEMON_INFO, daemon_id)


def test_every_daemon_publishes_its_version_and_clock(hosts: Hosts) -> None:
    daemons, _now = live_daemons(hosts.head.redis)
    seen = {(d.kind, d.name) for d in daemons}
    assert {("worker", "gpu1"), ("worker", "gpu2")} <= seen and any(k == "scheduler" for k, _ in seen)
    for d in daemons:
        assert d.version == gpulab_version() and d.clock_offset_s is not None and d.rtt_s is not None


def test_doctor_shows_each_node_version_clock_and_last_check_in(hosts: Hosts) -> None:
    head = hosts.head
    lines = head.cli("doctor").stdout.splitlines()
    for node in ("gpu1", "gpu2"):
        line = next(x for x in lines if f"worker {node}: gpulab" in x)
        assert line.startswith("ok") and f"gpulab {gpulab_version()}" in line and "vs Redis" in line and "seen" in line
    assert any(x.startswith("ok") and f"every daemon runs gpulab {gpulab_version()}" in x for x in lines)
    fake_daemon(head.redis, "worker:skewed:elsewhere:1", name="skewed", clock_offset_s=4.5, rtt_s=0.001)
    fake_daemon(head.redis, "worker:far:elsewhere:2", name="far", clock_offset_s=-300.0, rtt_s=0.001)
    try:
        result = head.cli("doctor")
        lines = result.stdout.splitlines()
        assert next(x for x in lines if "worker skewed:" in x).startswith("WARN")
        far = next(x for x in lines if "worker far:" in x)
        assert far.startswith("FAIL") and "-300.000s vs Redis" in far and "chrony" in far
        assert result.returncode == 1
    finally:
        forget_daemon(head.redis, "worker:skewed:elsewhere:1")
        forget_daemon(head.redis, "worker:far:elsewhere:2")


def test_a_daemon_of_another_version_refuses_to_start_unless_told(hosts: Hosts, tmp_path: Path) -> None:
    head, gpu1 = hosts.head, hosts.gpu1
    old = "worker:gpu9:elsewhere:4242"
    fake_daemon(head.redis, old, name="gpu9", version="0.0.1")
    try:
        for argv, stack in ((["worker", "--name", "gpu3", "--sim-gpus", "1x24GiB"], gpu1), (["scheduler"], head)):
            if argv == ["scheduler"]:  # a second scheduler host: its own state directory
                config = head.tmp_path.joinpath("config.toml").read_text()
                stack = Stack(tmp_path, head.env["GPULAB_REDIS_URL"], head.redis, config)
            refused = subprocess.run(
                [sys.executable, "-m", "cli", *argv], env=stack.env, capture_output=True, text=True, timeout=120
            )
            assert refused.returncode == 1, refused
            assert refused.stderr.count("\n") == 1 and f"{old} runs gpulab 0.0.1" in refused.stderr
            assert "--allow-mixed-versions" in refused.stderr
        assert not head.redis.exists(keys.node("gpu3"))  # it took nothing
        doctor = head.cli("doctor").stdout
        assert "versions: mixed (" in doctor and "0.0.1: worker gpu9" in doctor
        # A rolling upgrade says so, and the new worker runs beside the old one.
        argv = ["worker", "--name", "gpu3", "--sim-gpus", "1x24GiB", "--allow-mixed-versions"]
        mixed = Daemon([sys.executable, "-m", "cli", *argv], gpu1.env)
        try:
            mixed.wait_line("worker ready")
            job = head.submit("--node", "gpu3", "--", sys.executable, "-c", "print('on the upgraded node')")
            head.wait_state(job, JobState.COMPLETED)
            assert "on the upgraded node" in head.cli("logs", str(job)).stdout
        finally:
            assert mixed.stop() == 0
    finally:
        forget_daemon(head.redis, old)


@pytest.mark.slow  # imports torch and trains
def test_training_status_metrics_and_checkpoint_path_show_from_every_host(hosts: Hosts) -> None:
    head, gpu2 = hosts.head, hosts.gpu2
    digits = str(Path(__file__).resolve().parents[2] / "examples" / "digits.py")
    result = head.cli("train", digits, "--node", "gpu2", "--mem", "2GiB", "--epochs", "1", "--checkpoint-steps", "5")
    assert result.returncode == 0, result.stderr
    job = int(result.stdout)
    head.wait_state(job, JobState.COMPLETED, timeout=180)
    shown = json.loads(head.cli("show", "--json", str(job)).stdout)
    status = shown["status"]
    assert status["final"] is True and "test_accuracy" in status["metrics"]
    assert status["checkpoint_node"] == "gpu2" and status["checkpoint_step"] > 0
    checkpoint = Path(status["checkpoint"])
    assert checkpoint.is_relative_to(gpu2.state_dir) and checkpoint.exists()  # on the node that ran it
    text = head.cli("show", str(job)).stdout
    assert f"gpu2:{checkpoint}" in text and "test_accuracy=" in text
    assert "epoch 1/1" in head.cli("logs", str(job)).stdout
