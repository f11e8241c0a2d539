"""The per-job shim (worker/shim.py) on its own, driven by the test as its "worker": the
command starts only at `go`, the whole tree (a setsid'd double-forked escapee included) dies
when the worker goes silent (before the lease it renewed can lapse), when the worker dies, and
on SIGTERM; and the command's exit status comes through unchanged."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.chaos.markers import Marker, pid_alive
from tests.helpers.stack import eventually
from worker.runner import SHIM_ENV, SHIM_PATH
from worker.shim import ABORTED_EXIT, LAUNCH_FAILED_EXIT
from worker.shim_server import ServedShim, ShimServer

ROOT = Path(__file__).resolve().parents[2]


def shim_argv(worker_pid: int, report_fd: int, ttl: float, grace: float) -> list[str]:
    return [
        sys.executable, "-I", "-S", SHIM_PATH, "--node", "shim-test", "--state-dir", "/nonexistent",
        "--job", "7", "--attempt", "1", "--worker-pid", str(worker_pid),
        "--lease-ttl", str(ttl), "--kill-grace", str(grace), "--report-fd", str(report_fd),
    ]  # fmt: skip


def job_env(**extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "GPULAB_JOB_ID": "7",
        "GPULAB_ATTEMPT": "1",
        "GPULAB_NODE": "shim-test",
        **extra,
    }


class Shim:
    """A shim started by this test process (its "worker"): exec'd, or forked by a fork server."""

    server: ShimServer | None = None

    def __init__(self, argv: list[str], cwd: str, ttl: float = 30.0, grace: float = 30.0) -> None:
        report_r, report_w = os.pipe()
        self.proc: subprocess.Popen[bytes] | ServedShim
        if self.server is None:
            self.proc = subprocess.Popen(
                shim_argv(os.getpid(), report_w, ttl, grace),
                stdin=subprocess.PIPE,
                pass_fds=(report_w,),
                start_new_session=True,
                cwd="/",
                env=SHIM_ENV,
            )
        else:
            stdin_r, stdin_w = os.pipe()
            log = os.open(os.devnull, os.O_WRONLY)
            request = {"node": "shim-test", "job": 7, "attempt": 1, "lease_ttl": ttl, "kill_grace": grace}
            self.proc = self.server.spawn(request, stdin_r, report_w, log, stdin_w)
            os.close(stdin_r)
            os.close(log)
        os.close(report_w)
        self.report = report_r
        self.buffer = b""
        self.lines: list[str] = []
        self.send("launch " + json.dumps({"argv": argv, "env": job_env(), "cwd": cwd}))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        data = (line + "\n").encode()
        while data:
            data = data[os.write(self.proc.stdin.fileno(), data) :]

    def close_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def next_line(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line from the shim; so far {self.lines}"
            if select.select([self.report], [], [], remaining)[0]:
                chunk = os.read(self.report, 4096)
                assert chunk, f"the shim closed its report pipe; so far {self.lines}"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.lines.append(line.decode())
        return self.lines[-1]

    def ready(self) -> int:
        line = self.next_line()
        assert line.startswith("ready "), line
        return int(line.split()[1])

    def go(self) -> float:
        now = time.monotonic()
        self.send(f"go {now!r}")
        assert self.next_line() == "started"
        return now

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture(autouse=True, params=["exec", "served"])
def shim_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with an exec'd shim and with one forked by the fork server."""
    if request.param == "exec":
        yield "exec"
        return
    server = ShimServer(SHIM_PATH, SHIM_ENV, ["--node", "shim-test", "--state-dir", "/nonexistent"])
    Shim.server = server
    try:
        yield "served"
    finally:
        Shim.server = None
        server.close()


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Marker]:
    folder = tmp_path / "chaos"
    folder.mkdir()
    m = Marker(folder)
    yield m
    m.kill_leftovers()


def marked(marker: Marker, *extra: str) -> list[str]:
    return marker.job_args(*extra)[1:]  # without the leading "--"


def test_command_does_not_start_without_go(marker: Marker, tmp_path: Path) -> None:
    shim = Shim(marked(marker), str(tmp_path))
    child = shim.ready()
    assert pid_alive(child)
    shim.close_input()  # the worker's start transition was refused, or the worker died
    assert shim.wait() == ABORTED_EXIT
    assert not pid_alive(child)
    assert marker.starts() == [], "the command ran although the worker never said go"


def test_silent_worker_tree_dies_before_the_lease_lapses(marker: Marker, tmp_path: Path) -> None:
    """No renewal heard after `go`: SIGTERM at 0.75 ttl, SIGKILL by 0.9 ttl, whatever the kill
    grace, for the command and an escapee that left its group and session."""
    ttl = 3.0
    stubborn = tmp_path / "stubborn.py"  # ignores SIGTERM: only the SIGKILL deadline stops it
    stubborn.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        print('escapee', os.getpid(), flush=True)\n"
        "        while True: time.sleep(60)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "while True: time.sleep(60)\n"
    )
    out = tmp_path / "out.txt"
    shim = Shim(["/bin/sh", "-c", f'exec "{sys.executable}" "{stubborn}" > "{out}"'], str(tmp_path), ttl=ttl)
    child = shim.ready()
    renewed = shim.go()
    escapee = int(eventually(lambda: out.exists() and out.read_text().split()[1:2] and out.read_text().split()[1]))
    assert pid_alive(escapee)
    line = shim.next_line(timeout=ttl * 2)
    assert line.startswith("lost no lease renewal"), line
    assert shim.wait(timeout=ttl * 2) == -signal.SIGKILL
    ended = time.monotonic()
    assert not pid_alive(child) and not pid_alive(escapee)
    assert ended - renewed < ttl, f"the tree outlived the lease: {ended - renewed:.2f}s > {ttl}s"


def test_renewals_keep_the_job_running_and_its_status_comes_through(marker: Marker, tmp_path: Path) -> None:
    ttl = 1.0
    shim = Shim(marked(marker), str(tmp_path), ttl=ttl)
    shim.ready()
    shim.go()
    start = marker.wait_start(7, 1)
    until = time.monotonic() + 3 * ttl
    while time.monotonic() < until:  # three lease lengths, renewed every 0.2s
        shim.send(f"lease {time.monotonic()!r}")
        time.sleep(0.2)
    assert pid_alive(start.pid)
    assert marker.release(7, 1, code=7)
    assert shim.wait() == 7
    assert [e.code for e in marker.ends(7)] == [7]


def test_a_dead_worker_takes_the_tree_with_it(marker: Marker, tmp_path: Path, shim_kind: str) -> None:
    """kill -9 of the worker: the shim's parent-death signal stops the tree at once (the
    lease here is long: it is not the silence that does it). A served shim's parent is the
    fork server, which dies with the worker: the same end, one parent-death signal later."""
    if shim_kind == "exec":
        start_shim = (
            f"argv = {shim_argv(0, 0, 600.0, 1.0)!r}\n"
            "argv[argv.index('--worker-pid') + 1] = str(os.getpid())\n"
            "argv[argv.index('--report-fd') + 1] = str(w)\n"
            "p = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=(w,), start_new_session=True,"
            f" env={SHIM_ENV!r})\n"
            "send = lambda line: (p.stdin.write(line.encode()), p.stdin.flush())\n"
        )
    else:
        start_shim = (
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from worker.shim_server import ShimServer\n"
            f"tags = ['--node', 'shim-test', '--state-dir', '/nonexistent']\n"
            f"server = ShimServer({SHIM_PATH!r}, {SHIM_ENV!r}, tags)\n"
            "sr, sw = os.pipe()\n"
            "log = os.open(os.devnull, os.O_WRONLY)\n"
            "request = {'node': 'shim-test', 'job': 7, 'attempt': 1, 'lease_ttl': 600.0, 'kill_grace': 1.0}\n"
            "p = server.spawn(request, sr, w, log, sw)\n"
            "send = lambda line: os.write(sw, line.encode())\n"
        )
    script = (
        "import json, os, subprocess, sys, time\n"
        "r, w = os.pipe()\n"
        + start_shim
        + f"launch = {{'argv': {marked(marker, '--escape')!r}, 'env': {job_env()!r}, 'cwd': {str(tmp_path)!r}}}\n"
        "send('launch ' + json.dumps(launch) + '\\n')\n"
        "os.read(r, 4096)\n"
        "send(f'go {time.monotonic()!r}\\n')\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    shim_pid = int(worker.stdout.readline())
    parent = psutil.Process(shim_pid).ppid()
    assert (parent if shim_kind == "exec" else psutil.Process(parent).ppid()) == worker.pid
    start = marker.wait_start(7, 1)
    (escapee,) = marker.escaped(7)
    worker.kill()
    worker.wait()
    eventually(lambda: not pid_alive(start.pid) and not pid_alive(escapee) and not pid_alive(shim_pid), timeout=10)
    assert marker.ends(7) == []


def test_sigterm_stops_the_whole_tree(marker: Marker, tmp_path: Path) -> None:
    shim = Shim(marked(marker, "--escape"), str(tmp_path))
    shim.ready()
    shim.go()
    start = marker.wait_start(7, 1)
    (escapee,) = marker.escaped(7)
    shim.proc.send_signal(signal.SIGTERM)  # what the worker sends on cancel, time-out, shutdown
    assert shim.wait() == -signal.SIGTERM
    assert not pid_alive(start.pid) and not pid_alive(escapee)


def test_shim_says_whether_the_command_ended_before_any_stop(tmp_path: Path) -> None:
    # The worker trusts a job's own result over a stop it sent too late (its lease lapsed
    # while it was frozen, and the job had exited meanwhile): only the shim can tell the two apart.
    shim = Shim(["/bin/sh", "-c", "exit 0"], str(tmp_path))
    shim.ready()
    shim.go()
    assert shim.next_line() == "ended"
    assert shim.wait() == 0
    shim = Shim(["/bin/sleep", "60"], str(tmp_path))
    shim.ready()
    shim.go()
    shim.proc.send_signal(signal.SIGTERM)
    assert shim.wait() == -signal.SIGTERM
    assert "ended" not in _rest_of_report(shim)


def _rest_of_report(shim: Shim) -> list[str]:
    while True:
        chunk = os.read(shim.report, 4096)
        if not chunk:
            break
        shim.buffer += chunk
    return [line.decode() for line in shim.buffer.split(b"\n") if line]


def test_exit_status_and_signal_come_through(tmp_path: Path) -> None:
    shim = Shim(["/bin/sh", "-c", "exit 3"], str(tmp_path))
    shim.ready()
    shim.go()
    assert shim.wait() == 3
    shim = Shim(["/bin/sh", "-c", "kill -SEGV $$"], str(tmp_path))
    shim.ready()
    shim.go()
    assert shim.wait() == -signal.SIGSEGV
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("core")], "the shim dumped a core"


def test_directory_it_cannot_enter_is_a_launch_failure(tmp_path: Path) -> None:
    shim = Shim(["/bin/true"], str(tmp_path / "missing"))
    line = shim.next_line()
    assert line.startswith("fail cannot enter directory") and "missing" in line, line
    assert shim.wait() == LAUNCH_FAILED_EXIT


def test_program_it_cannot_execute_is_a_launch_failure(tmp_path: Path) -> None:
    shim = Shim(["/nonexistent/program"], str(tmp_path))
    shim.ready()
    shim.send(f"go {time.monotonic()!r}")
    line = shim.next_line()
    assert line.startswith("fail cannot start '/nonexistent/program'"), line
    assert shim.wait() == LAUNCH_FAILED_EXIT


def test_command_gets_the_job_environment_not_the_shims(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    facts = "[dict(os.environ), os.getcwd(), os.getsid(0) == os.getpid()]"
    code = f"import json, os; json.dump({facts}, open({str(out)!r}, 'w'))"
    shim = Shim([sys.executable, "-c", code], str(tmp_path))
    shim.ready()
    shim.go()
    assert shim.wait() == 0
    env, cwd, leads_its_session = json.loads(out.read_text())
    env.pop("LC_CTYPE", None)  # set by the job's own Python (PEP 538 locale coercion), not the shim
    assert env == job_env()
    assert cwd == str(tmp_path) and leads_its_session
