"""SimProbe with real `worker.sim_alloc` processes: what they announce is what the probe reports.

Synchronisation is by the line sim_alloc prints once its file is written, and by waiting
for the process to exit; never by sleeping.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.gpus import GpuProcess, GpuSnapshot
from jobs.sizes import GiB
from worker.probe import GpuProbe
from worker.sim_probe import (
    SimProbe,
    clear_failed,
    mark_failed,
    parse_sim_gpus,
    sim_uuid,
)

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20.0


class Alloc:
    """A running `python -m worker.sim_alloc`, with its stdout lines in a queue."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.sim_alloc", *args],
            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def await_line(self, prefix: str) -> str:
        """The first line starting with `prefix`; fails if the process ends or WAIT_S passes."""
        seen: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                pytest.fail(f"no line {prefix!r} within {WAIT_S}s; saw {seen}")
            if line is None:
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"sim_alloc ended before {prefix!r}; saw {seen}; stderr: {stderr}")
            seen.append(line)
            if line.startswith(prefix):
                return line

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=WAIT_S)


@pytest.fixture
def sim_dir(tmp_path: Path) -> Path:
    return tmp_path / "sim"


@pytest.fixture
def probe(sim_dir: Path) -> Iterator[SimProbe]:
    p = SimProbe("n1", [24 * GiB, 24 * GiB], sim_dir)
    yield p
    p.close()


@pytest.fixture
def allocs() -> Iterator[list[Alloc]]:
    started: list[Alloc] = []
    yield started
    for a in started:
        if a.proc.poll() is None:
            a.proc.kill()
        a.proc.wait(timeout=WAIT_S)


def start(allocs: list[Alloc], args: list[str], env: dict[str, str] | None = None) -> Alloc:
    a = Alloc(args, env)
    allocs.append(a)
    return a


U0, U1 = sim_uuid("n1", 0), sim_uuid("n1", 1)


def test_probe_is_a_gpu_probe(probe: SimProbe) -> None:
    p: GpuProbe = probe
    snap = p.snapshot()
    assert [d.uuid for d in snap.devices] == [U0, U1]
    assert all(d.name == "Simulated GPU" and d.healthy for d in snap.devices)
    assert all(d.total_bytes == d.free_bytes == 24 * GiB and d.used_bytes == 0 for d in snap.devices)
    assert all(d.utilization_pct == 0 and d.processes == () for d in snap.devices)
    assert GpuSnapshot.from_json(snap.to_json()) == snap


def test_allocation_is_seen_and_released_on_sigterm(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    a = start(allocs, ["4GiB", "--gpu", U0, "--sim-dir", str(sim_dir), "--until-signal"])
    assert a.await_line("allocated") == f"allocated {4 * GiB} on {U0}"
    d0, d1 = probe.snapshot().devices
    assert (d0.used_bytes, d0.free_bytes, d0.utilization_pct) == (4 * GiB, 20 * GiB, 100)
    assert d0.processes == (GpuProcess(pid=a.pid, used_bytes=4 * GiB),)
    assert (d1.used_bytes, d1.utilization_pct, d1.processes) == (0, 0, ())

    assert a.stop(signal.SIGTERM) == 0
    assert not (sim_dir / U0 / str(a.pid)).exists()
    d0 = probe.snapshot().devices[0]
    assert (d0.used_bytes, d0.free_bytes, d0.processes) == (0, 24 * GiB, ())


def test_sigint_also_releases(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    a = start(allocs, ["1GiB", "--gpu", U1, "--sim-dir", str(sim_dir), "--until-signal"])
    a.await_line("allocated")
    assert a.stop(signal.SIGINT) == 0
    assert list((sim_dir / U1).iterdir()) == []


def test_defaults_from_cuda_visible_devices_and_env(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    env = {"CUDA_VISIBLE_DEVICES": f"{U1},{U0}", "GPULAB_SIM_DIR": str(sim_dir)}
    a = start(allocs, ["2GiB", "--until-signal"], env)
    assert a.await_line("allocated") == f"allocated {2 * GiB} on {U1}"
    d0, d1 = probe.snapshot().devices
    assert d0.used_bytes == 0 and d1.used_bytes == 2 * GiB
    assert a.stop() == 0


def test_all_visible_allocates_on_each(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    env = {"CUDA_VISIBLE_DEVICES": f"{U0},{U1}", "GPULAB_SIM_DIR": str(sim_dir)}
    a = start(allocs, ["3GiB", "--all-visible", "--until-signal"], env)
    a.await_line(f"allocated {3 * GiB} on {U0}")
    a.await_line(f"allocated {3 * GiB} on {U1}")
    assert [d.used_bytes for d in probe.snapshot().devices] == [3 * GiB, 3 * GiB]
    assert a.stop() == 0
    assert [d.used_bytes for d in probe.snapshot().devices] == [0, 0]


def test_hold_exits_by_itself_and_cleans_up(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    a = start(allocs, ["1GiB", "--gpu", U0, "--sim-dir", str(sim_dir), "--hold", "0.01"])
    a.await_line("allocated")
    assert a.proc.wait(timeout=WAIT_S) == 0
    assert list((sim_dir / U0).iterdir()) == []


def test_processes_sum_and_free_floors_at_zero(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    a = start(allocs, ["16GiB", "--gpu", U0, "--sim-dir", str(sim_dir), "--until-signal"])
    b = start(allocs, ["16GiB", "--gpu", U0, "--sim-dir", str(sim_dir), "--until-signal"])
    a.await_line("allocated")
    b.await_line("allocated")
    d0 = probe.snapshot().devices[0]
    assert d0.used_bytes == 32 * GiB  # oversubscribed: visible, not hidden
    assert d0.free_bytes == 0
    assert {p.pid for p in d0.processes} == {a.pid, b.pid}
    assert a.stop() == 0
    assert probe.snapshot().devices[0].used_bytes == 16 * GiB


def test_steps_ramp_up(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    args = ["4GiB", "--gpu", U0, "--sim-dir", str(sim_dir), "--steps", "4", "--step-interval", "0.01"]
    a = start(allocs, [*args, "--until-signal"])
    steps = [a.await_line(f"step {k}/4:") for k in (1, 2, 3)]
    assert steps == [f"step {k}/4: {k * GiB} bytes" for k in (1, 2, 3)]
    a.await_line("allocated")
    assert probe.snapshot().devices[0].used_bytes == 4 * GiB
    assert a.stop() == 0


def test_kill9_zombie_is_ignored_and_its_file_removed(probe: SimProbe, sim_dir: Path, allocs: list[Alloc]) -> None:
    a = start(allocs, ["8GiB", "--gpu", U0, "--sim-dir", str(sim_dir), "--until-signal"])
    a.await_line("allocated")
    a.proc.kill()
    # Block until the child has died, without reaping it (WNOWAIT): it stays a zombie.
    os.waitid(os.P_PID, a.pid, os.WEXITED | os.WNOWAIT)
    file = sim_dir / U0 / str(a.pid)
    assert file.exists()  # kill -9: no chance to clean up
    d0 = probe.snapshot().devices[0]
    assert (d0.used_bytes, d0.processes) == (0, ())
    assert not file.exists()
    assert a.proc.wait(timeout=WAIT_S) == -signal.SIGKILL


def test_file_of_exited_pid_is_ignored_and_removed(probe: SimProbe, sim_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=WAIT_S)
    file = sim_dir / U1 / str(dead.pid)
    file.write_text(str(5 * GiB))
    d1 = probe.snapshot().devices[1]
    assert (d1.used_bytes, d1.free_bytes, d1.processes) == (0, 24 * GiB, ())
    assert not file.exists()


def test_file_older_than_its_pid_is_a_reused_pid(probe: SimProbe, sim_dir: Path) -> None:
    file = sim_dir / U0 / str(os.getpid())  # this process is alive ...
    file.write_text(str(GiB))
    assert probe.snapshot().devices[0].used_bytes == GiB
    os.utime(file, (0, 0))  # ... but the file predates it: left by an earlier holder of the pid
    assert probe.snapshot().devices[0].used_bytes == 0
    assert not file.exists()


def test_unreadable_counts_are_ignored(probe: SimProbe, sim_dir: Path) -> None:
    (sim_dir / U0 / str(os.getpid())).write_text("lots\n")
    (sim_dir / U0 / ".123.tmp").write_text("999")
    (sim_dir / U0 / "notes").write_text("999")
    d0 = probe.snapshot().devices[0]
    assert (d0.used_bytes, d0.processes) == (0, ())


def test_fail_file_marks_gpu_unhealthy(probe: SimProbe, sim_dir: Path) -> None:
    mark_failed(sim_dir, U1, "Xid 79: GPU has fallen off the bus")
    d0, d1 = probe.snapshot().devices
    assert d0.healthy and d0.error is None
    assert not d1.healthy
    assert d1.error == "Xid 79: GPU has fallen off the bus"
    assert (d1.uuid, d1.total_bytes, d1.free_bytes) == (U1, 24 * GiB, 0)
    clear_failed(sim_dir, U1)
    assert probe.snapshot().devices[1].healthy


def test_empty_fail_file_still_fails(probe: SimProbe, sim_dir: Path) -> None:
    (sim_dir / U0 / "FAIL").write_text("")
    d0 = probe.snapshot().devices[0]
    assert not d0.healthy and d0.error == "simulated failure"


def test_nodes_sharing_a_sim_dir_do_not_mix(sim_dir: Path) -> None:
    a = SimProbe("a", [GiB], sim_dir)
    b = SimProbe("b", [2 * GiB], sim_dir)
    (sim_dir / sim_uuid("a", 0) / str(os.getpid())).write_text(str(GiB // 2))
    assert a.snapshot().devices[0].used_bytes == GiB // 2
    assert b.snapshot().devices[0].used_bytes == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["1GiB", "--gpu", U0], {"GPULAB_SIM_DIR": ""}, "GPULAB_SIM_DIR"),
        (["1GiB", "--sim-dir", "{sim}"], {"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES"),
        (["1GiB", "--gpu", "GPU-nope", "--sim-dir", "{sim}"], {}, "no simulated GPU GPU-nope"),
        (["0.5", "--gpu", U0, "--sim-dir", "{sim}"], {}, "memory needs a unit"),
        (["1GiB", "--gpu", U0, "--sim-dir", "{sim}", "--steps", "0"], {}, "--steps"),
    ],
)
def test_sim_alloc_rejects_bad_input(
    probe: SimProbe, sim_dir: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    argv = [a.replace("{sim}", str(sim_dir)) for a in args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    done = subprocess.run(
        [sys.executable, "-m", "worker.sim_alloc", *argv],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=WAIT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("2x24GiB", [24 * GiB, 24 * GiB]),
        ("24GiB,16GiB", [24 * GiB, 16 * GiB]),
        (["24GiB", "24GiB"], [24 * GiB, 24 * GiB]),
        ("1x80G", [80 * GiB]),
        ("2 X 8GiB, 16GiB", [8 * GiB, 8 * GiB, 16 * GiB]),
        (["2x8GiB", "16GiB"], [8 * GiB, 8 * GiB, 16 * GiB]),
        ("24GiB", [24 * GiB]),
    ],
)
def test_parse_sim_gpus(spec: str | list[str], sizes: list[int]) -> None:
    assert parse_sim_gpus(spec) == sizes


@pytest.mark.parametrize("spec", ["", [], "0x24GiB", "2x", "2x0.5", "24GiB,", "100x1GiB", "2x-1GiB", ["24"]])
def test_parse_sim_gpus_rejects(spec: str | list[str]) -> None:
    with pytest.raises(ValueError):
        parse_sim_gpus(spec)
