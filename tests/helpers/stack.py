"""A gpulab stack for tests: real daemons as subprocesses on a real redis-server, with
awaitable output, and a TOML config built from overrides instead of string edits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from cli.client import ApiClient
from jobs.record import JobRecord
from jobs.states import JobState
from jobs.store import JobStore

ROOT = Path(__file__).resolve().parent.parent.parent
WAIT_S = 60.0  # generous upper bound for any awaited event on a loaded 2-core CI machine

# Short leases and heartbeats so faults show within seconds.
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "scheduler": {"housekeeping_interval_s": 0.5, "assign_timeout_s": 10},
    "worker": {"heartbeat_interval_s": 0.2, "lease_ttl_s": 3, "kill_grace_s": 2},
}


def test_config(**sections: Mapping[str, Any]) -> str:
    """The test config with overrides, as TOML: test_config(scheduler={"max_requeues": 0})."""
    merged = {name: dict(values) for name, values in BASE_CONFIG.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    lines = []
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


TEST_CONFIG = test_config()


_PORTS_GIVEN: set[int] = set()
PORT_BASE, PORT_WORKERS = 12000, 16  # 12000-27999: below Linux's default ephemeral range (32768-60999)
PORT_BLOCK = 1000  # ports per xdist worker, from PORT_BASE up: below the kernel's ephemeral range


def free_port() -> int:
    """A TCP port no one listens on, for a server a test starts. Not bind(0): that draws from
    the ephemeral range, where the kernel may hand the same port to the next caller (a
    Sentinel test got its primary's port twice) or to any client socket before our server
    binds it. Instead: a block of its own per xdist worker, below that range, and never the
    same port twice in one process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = PORT_BASE + (int(worker) if worker.isdigit() else 0) % PORT_WORKERS * PORT_BLOCK
    for port in range(first, first + PORT_BLOCK):
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK - 1}")


class Daemon:
    """A daemon subprocess whose output is collected; `wait_line` awaits a line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, needle: str, timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(needle in x for x in self.lines)):
                    raise AssertionError(f"no line with {needle!r}; output so far:\n" + "\n".join(self.lines))
                self._changed.wait(remaining)

    def stop(self, sig: int = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Where it hangs: the daemons print every thread's stack on SIGUSR1 (faulthandler).
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(AssertionError):
                self.wait_line("most recent call first", timeout=10)
            self.proc.kill()
            self.proc.wait(timeout=60)
            tail = "\n".join(self.lines[-200:])
            raise AssertionError(f"{self.proc.args} did not stop within 60 s; its output:\n{tail}") from None


class Stack:
    """A gpulab stack for one test: its own state dir, the session's Redis (flushed)."""

    def __init__(self, tmp_path: Path, redis_url: str, client: redis.Redis, config_text: str = TEST_CONFIG) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir()
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text)
        # No inherited COLUMNS/LINES: piped CLI output is then laid out wide (cli/render.py),
        # whatever terminal (or pytest-xdist worker) the suite runs under; tests that check a
        # width set COLUMNS themselves.
        inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.env = dict(
            inherited,
            GPULAB_STATE_DIR=str(self.state_dir),
            GPULAB_REDIS_URL=redis_url,
            GPULAB_CONFIG=str(config_path),
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        self.redis = client
        self.store = JobStore(client)
        self.api = ApiClient(self.state_dir / "gpulab.sock")
        self.daemons: list[Daemon] = []
        self.scheduler: Daemon | None = None
        self.tmp_path = tmp_path

    @property
    def sim_dir(self) -> Path:
        return self.state_dir / "sim"

    def start_scheduler(self, *, wrap: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Daemon:
        """`wrap`: an argv prefix (e.g. `ip netns exec NAME`); `env`: overrides of the stack's env."""
        self.scheduler = Daemon([*wrap, sys.executable, "-m", "cli", "scheduler"], {**self.env, **(env or {})})
        self.daemons.append(self.scheduler)  # before the wait: one that never gets ready is stopped too
        self.scheduler.wait_line("scheduler ready")
        return self.scheduler

    def start_worker(
        self,
        name: str = "n1",
        sim_gpus: str | None = "1x24GiB",
        *,
        wrap: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Daemon:
        """A worker on simulated GPUs, or on this host's real ones (through NVML) with sim_gpus=None.
        `wrap` and `env` as for start_scheduler."""
        sim = ["--sim-gpus", sim_gpus] if sim_gpus else []
        argv = [*wrap, sys.executable, "-m", "cli", "worker", "--name", name, *sim]
        worker = Daemon(argv, {**self.env, **(env or {})})
        self.daemons.append(worker)
        worker.wait_line("worker ready")
        return worker

    def cli(self, *args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            cwd=cwd or self.tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def cli_bytes(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """`cli` for output that is bytes, not text (`gpulab logs` piped prints the job's bytes)."""
        return subprocess.run(
            [sys.executable, "-m", "cli", *args], env=self.env, cwd=self.tmp_path, capture_output=True, timeout=120
        )

    def submit(self, *args: str) -> int:
        result = self.cli("submit", *args)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    def fifo(self, name: str) -> Path:
        path = self.tmp_path / name
        os.mkfifo(path)
        return path

    def hold_job_args(self, size: str, fifo: Path, *extra: str) -> list[str]:
        return ["--", sys.executable, "-m", "tests.helpers.hold_job", size, str(fifo), *extra]

    def wait_for(self, job_id: int, predicate: Callable[[JobRecord], bool], timeout: float = WAIT_S) -> JobRecord:
        record = self.store.wait_for(job_id, predicate, timeout)
        assert record is not None and predicate(record), f"job {job_id} never matched; now {record}"
        return record

    def wait_state(self, job_id: int, *states: JobState, timeout: float = WAIT_S) -> JobRecord:
        return self.wait_for(job_id, lambda r: r.state in states, timeout)

    def wait_log(self, job_id: int, needle: str, timeout: float = WAIT_S) -> str:
        """Await a line in a job's log. The log is a plain file, so this polls it (bounded)."""
        return eventually(lambda: _log_line(self.state_dir / "logs" / f"{job_id}.log", needle), timeout)

    def assert_ran_once(self, job_id: int) -> None:
        """Dispatched exactly once, on its first attempt."""
        record = self.store.get(job_id)
        assert record is not None and record.attempt == 1, record
        assigned = [e for e in self.store.history(job_id) if e["state"] == "ASSIGNED"]
        assert len(assigned) == 1, self.store.history(job_id)

    def stop(self) -> None:
        """Every daemon, even when one will not stop: that one is killed, the others are still
        stopped, and the first failure is raised at the end (a worker that hung on SIGTERM
        once left its scheduler running after the test)."""
        failure: BaseException | None = None
        for daemon in reversed(self.daemons):
            try:
                daemon.stop()
            except BaseException as exc:
                failure = failure or exc
                daemon.proc.kill()
                daemon.proc.wait()
        if failure is not None:
            raise failure


def _log_line(path: Path, needle: str) -> str | None:
    try:
        for line in path.read_text().splitlines():
            if needle in line:
                return line
    except FileNotFoundError:
        pass
    return None


def eventually(probe: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.05) -> Any:
    """For conditions with no event to await (a file's content, a heartbeat's snapshot):
    poll `probe` until it returns something truthy, failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {probe}")
        time.sleep(interval)


def release(fifo: Path, code: int = 0) -> None:
    """Let a hold_job finish with `code` (opening the FIFO blocks until the job reads it)."""
    with open(fifo, "w") as f:
        f.write(str(code))
