"""One job on this node: start it through its shim, watch it, stop it, record how it ended.

The job's command runs from argv (no shell), as its owner, in its own session, with the
assigned GPUs in CUDA_VISIBLE_DEVICES (as UUIDs, with PCI bus order) and stdout+stderr in the
job's log. Between the worker and the command sits the job's shim (worker/shim.py): it
enters the job's directory as the user, starts the command only after the worker's
ASSIGNED -> RUNNING transition was accepted, keeps the whole tree (setsid'd escapees too) and
kills it when the worker dies or stops renewing the job's lease, before the lease lapses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import psutil

from jobs import lifecycle
from jobs.config import Config
from jobs.lifecycle import Attempt, Fence, Transition
from jobs.profiles import Sample
from jobs.record import JobRecord
from jobs.sizes import MiB, format_size
from jobs.spec import SpecError, validate_spec
from jobs.states import JobState, Reason
from jobs.text import duration, safe
from worker import jobfiles
from worker.identity import IdentityError, RunAs, resolve_run_as
from worker.idle import IdleWatch
from worker.outcome import Outcome, classify
from worker.process_tree import CHILD_STARTS, kill_tree, signal_tree, tree_pids
from worker.shim import ABORTED_EXIT
from worker.shim_server import ServedShim, ShimServer, ShimServerError

log = logging.getLogger("gpulab.worker")
LOG_TAIL_BYTES = 64 * 1024
OOM_RETRY_GROWTH = 1.25
SHIM_PATH = str(Path(__file__).resolve().with_name("shim.py"))
# The shim's own environment: nothing of the job's (the command gets that through the pipe).
SHIM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
SHIM_ANSWER_S = 30.0  # the shim starts a Python interpreter: generous on a loaded node
FINAL_KILL_AFTER_S = 5.0  # past the kill grace, the shim itself is killed too
MAX_MEM_BYTES = 2**50  # what jobs.spec.validate_spec accepts for --mem
MEMORY_STOP = "memory: "  # stop reason of a job stopped over its request (worker/enforcement.py)


STOP_WHY = {
    "shutdown": "worker shut down",
    "lease": "lease lost; stopped",
    "fenced": "worker fenced (another worker took its node name)",
}


class LaunchError(RuntimeError):
    pass


class JobRunner:
    def __init__(
        self,
        record: JobRecord,
        config: Config,
        node: str,
        *,
        simulated: bool,
        store_transition: Callable[[Transition], object],
        record_end: Callable[[Transition, bool], None],
        before_finish: Callable[[JobRunner], None],
        fence: Fence | None = None,
        gpu_totals: Mapping[str, int] | None = None,
        shim_python: Callable[[RunAs | None], str] | None = None,
        on_log_open: Callable[[int, int, int, int], None] | None = None,
        record_profile: Callable[[JobRunner, Sample], None] | None = None,
        shim_server: ShimServer | None = None,
    ) -> None:
        self.record = record
        self.job_id = record.id
        self.attempt = record.attempt
        self.writer = Attempt(record.id, record.attempt, node, fence)
        self.config = config
        self.node = node
        self.simulated = simulated
        self.store_transition = store_transition
        self.record_end = record_end
        self.before_finish = before_finish
        self.gpu_uuids = [g.uuid for g in record.gpus]
        self.gpu_totals: Mapping[str, int] = gpu_totals if gpu_totals is not None else {}  # the daemon's, kept current
        self.shim_python = shim_python or (lambda _run_as: sys.executable)
        self.on_log_open = on_log_open  # (job id, attempt, read fd, start offset): the log shipper
        self.record_profile = record_profile
        self.shim_server = shim_server  # forks the shim; None: a new interpreter per job
        self.log_path = config.log_dir / f"{record.id}.log"
        self.run_dir = config.state_dir / "run" / str(record.id)
        self.status_path = self.run_dir / "status.json"
        self.checkpoint_dir = config.checkpoint_root / str(record.id)
        self.proc: subprocess.Popen[bytes] | ServedShim | None = None  # the shim
        self.job_pid: int | None = None  # the command (what the record shows)
        self.started_at = 0.0
        self.started = False  # the shim exec'd the command
        self.fail_message = ""  # the shim could not start it
        self.lost_message = ""  # the shim stopped it on its own (no lease renewal heard)
        self.peak: dict[str, int] = {}
        self.current: dict[str, int] = {}
        self.mem_warning = ""
        self._stop_reason = ""  # "cancelled" | "timeout" | "preempted" | "idle" | "lease" | ... | "gpu lost: ..."
        self.ended_unasked = False  # the shim saw the command exit before any stop request
        self.preempted_for = 0  # the job this one was preempted for
        self.idle = IdleWatch(config.policy.idle_after_s, config.policy.idle_max_util_percent)
        self.idle_written: float | None = None  # the idle_since last written to the record
        self.idle_due = False  # the idle spell just crossed idle_after_s: act on the next heartbeat
        self._gate_open = False  # "go" sent: from now on a stop signals the shim
        self._lock = threading.Lock()
        self._pipe_lock = threading.Lock()
        self._to_shim = -1
        self._from_shim = -1
        self._report = b""
        self._status_mtime = 0
        self._known: dict[int, float] = {}  # pid -> create time of every tree member seen
        self.run_as: RunAs | None = None
        self.done = threading.Event()

    @property
    def gate_open(self) -> bool:
        """ "go" was sent: the job is RUNNING in Redis with its own lease."""
        return self._gate_open

    @property
    def pid(self) -> int | None:
        """The shim's pid: the root of the job's process tree."""
        return self.proc.pid if self.proc else None

    # ---- start --------------------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        spec = self.record.spec
        env = dict(spec.env)
        env.update(
            {
                "CUDA_VISIBLE_DEVICES": ",".join(self.gpu_uuids),
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "GPULAB_JOB_ID": str(self.job_id),
                "GPULAB_ATTEMPT": str(self.attempt),
                "GPULAB_NODE": self.node,
                "GPULAB_STATUS_FILE": str(self.status_path),
                "GPULAB_CHECKPOINT_DIR": str(self.checkpoint_dir),
            }
        )
        if spec.mem_bytes is not None:
            env["GPULAB_MEM_BYTES"] = str(spec.mem_bytes)
        if self.simulated:
            env["GPULAB_SIM_DIR"] = str(self.config.sim_dir)
        return env

    def start(self) -> None:
        """Start the shim, have it enter the job's directory and fork the command, mark the
        job RUNNING with the command's pid and its lease, and only then let the command run.

        If the job was cancelled or moved meanwhile, the command never starts
        (TransitionRefused propagates). Raises LaunchError if it cannot start. (The worker
        starts a batch of launches with the same steps, the transitions in one round trip:
        worker/daemon.py WorkerDaemon.launch_many.)
        """
        self.spawn()
        started = self.await_start()
        before = time.monotonic()  # the lease set below lasts at least until before + ttl
        try:
            self.store_transition(started)
        except BaseException:
            self.withdraw()  # refused, fenced or Redis away: the command never runs
            raise
        self.release(before)

    def spawn(self) -> None:
        """The job's files and its shim, which enters the job's directory, forks the command
        and holds it at its gate (it waits for "go"). Raises LaunchError (its end recorded)."""
        try:
            run_as = resolve_run_as(self.record.uid)
        except IdentityError as exc:
            self._end_launch(str(exc))
            raise LaunchError(str(exc)) from None
        self.run_as = run_as
        try:
            log_fd = self._prepare_files(run_as)
        except OSError as exc:
            message = f"cannot prepare the job's files under {self.config.state_dir}: {exc.strerror or exc}"
            self._end_launch(message)
            raise LaunchError(message) from None
        try:
            self._spawn_shim(run_as, log_fd)
        finally:
            os.close(log_fd)

    def await_start(self, deadline: float | None = None) -> Transition:
        """The shim's `ready <pid>` (by `deadline`, monotonic; default SHIM_ANSWER_S from now):
        the command is forked and waits at its gate. Returns the ASSIGNED -> RUNNING
        transition to apply before `release`. Raises LaunchError (its end recorded)."""
        answer = self._await_ready(deadline)
        if not answer.startswith("ready "):
            message = answer.removeprefix("fail ") if answer.startswith("fail ") else answer
            self._abort_shim()
            self._log_line(f"gpulab: {message}")
            if not answer.startswith("fail "):
                # The shim died or gave up before its gate (this worker stalled, or something
                # killed it): the command cannot have run and nothing is wrong with the job.
                self._not_started(message)
            self._end_launch(message)
            raise LaunchError(message)
        job_pid = _reported_child(answer, self.proc)
        if job_pid is None:
            self._abort_shim()
            if _pid_gone(answer):
                # The shim's child is already gone (the shim gave up on a stalled worker and
                # killed it): nothing ran; the job waits again.
                self._not_started("the job's launcher gave up before it was started")
            # A live pid that is not the shim's child: the job forged its shim's word, and
            # root must not act on that pid.
            message = f"the job's launcher reported {safe(answer)!r}, not a child of its own"
            self._end_launch(message)
            raise LaunchError(message)
        self.job_pid = job_pid
        return lifecycle.start(self.writer, job_pid, str(self.log_path), self.config.worker.lease_ttl_s, time.time())

    def withdraw(self) -> None:
        """The start transition was not accepted (refused, fenced, Redis away) or could not be
        tried: the command never runs, and nothing is recorded (the scheduler decides)."""
        self._abort_shim()
        self.done.set()

    def release(self, before: float) -> None:
        """The start transition was accepted (its lease lasts at least until `before` + ttl):
        "go" to the shim, unless the job was stopped while starting (cancel, shutdown): then
        it never runs, and its watcher records it as not started."""
        with self._lock:
            if not self._stop_reason:
                self._gate_open = True
                self._send(f"go {before!r}")
                self.started_at = time.monotonic()
        if not self._gate_open:
            self._abort_shim()
        threading.Thread(target=self._watch, name=f"job-{self.job_id}", daemon=True).start()

    def _prepare_files(self, run_as: RunAs | None) -> int:
        """The job's run and checkpoint directories (its own, 0700) and its log (0600), made by
        the worker under its state dir without following anything the job could have placed."""
        uid, gid = (run_as.uid, run_as.gid) if run_as else (None, None)
        state = self.config.state_dir
        name = str(self.job_id)
        jobfiles.job_dir(state, "run", name, uid, gid)
        jobfiles.remove_in_job_dir(state, "run", name, "status.json")  # an earlier attempt's
        jobfiles.job_dir(state, "checkpoints", name, uid, gid)
        log_fd = jobfiles.open_log(state, f"{name}.log", uid, gid)
        if self.on_log_open is not None:
            # A read fd on the very inode the job will write (not the path, which is only a
            # name), from this attempt's first byte: the worker ships it into Redis.
            read_fd = os.open(f"/proc/self/fd/{log_fd}", os.O_RDONLY | os.O_CLOEXEC)
            self.on_log_open(self.job_id, self.attempt, read_fd, os.fstat(log_fd).st_size)
        if self.attempt > 1:
            os.write(log_fd, f"=== gpulab: job {self.job_id} attempt {self.attempt} on {self.node} ===\n".encode())
        return log_fd

    def _spawn_shim(self, run_as: RunAs | None, log_fd: int) -> None:
        report_r, report_w = os.pipe()
        if self.shim_server is not None:
            self._spawn_served(run_as, log_fd, report_r, report_w)
            return
        argv = [
            self.shim_python(run_as), "-I", "-S", SHIM_PATH,
            "--node", self.node,
            "--state-dir", str(self.config.state_dir),  # with the node: which worker's (one host, many stacks)
            "--job", str(self.job_id),
            "--attempt", str(self.attempt),
            "--worker-pid", str(os.getpid()),
            "--lease-ttl", repr(self.config.worker.lease_ttl_s),
            "--kill-grace", repr(self.config.worker.kill_grace_s),
            "--report-fd", str(report_w),
        ]  # fmt: skip
        try:
            with self._lock, CHILD_STARTS:  # until its pid is where the orphan sweep looks
                self.proc = subprocess.Popen(
                    argv,
                    cwd="/",  # root never enters the job's directory: the shim does, as the user
                    env=SHIM_ENV,
                    stdin=subprocess.PIPE,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    pass_fds=(report_w,),
                    start_new_session=True,
                    close_fds=True,
                    user=run_as.uid if run_as else None,
                    group=run_as.gid if run_as else None,
                    extra_groups=list(run_as.groups) if run_as else None,
                    umask=0o022 if run_as else -1,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(report_r)
            message = f"cannot start the job's launcher: {getattr(exc, 'strerror', None) or exc}"
            self._end_launch(message)
            raise LaunchError(message) from None
        finally:
            os.close(report_w)
        self._send_launch(run_as, report_r)

    def _spawn_served(self, run_as: RunAs | None, log_fd: int, report_r: int, report_w: int) -> None:
        """The shim forked by the worker's fork server: the same process as the exec'd one
        (same user, groups, umask, session, fds, environment), without an interpreter start."""
        assert self.shim_server is not None
        stdin_r, stdin_w = os.pipe()
        request = {
            "node": self.node,
            "job": self.job_id,
            "attempt": self.attempt,
            "uid": run_as.uid if run_as else None,
            "gid": run_as.gid if run_as else None,
            "groups": list(run_as.groups) if run_as else None,
            "umask": 0o022 if run_as else None,
            "lease_ttl": self.config.worker.lease_ttl_s,
            "kill_grace": self.config.worker.kill_grace_s,
        }
        try:
            with self._lock:
                self.proc = self.shim_server.spawn(request, stdin_r, report_w, log_fd, stdin_w)
        except ShimServerError as exc:
            # The worker's own fork server failed (it died, or did not answer): nothing of
            # the job ran and nothing is wrong with it; it waits again (the next launch
            # starts a new server).
            os.close(report_r)
            os.close(stdin_w)
            self._not_started(f"the shim server failed: {exc}")
        except OSError as exc:
            os.close(report_r)
            os.close(stdin_w)
            message = f"cannot start the job's launcher: {exc.strerror or exc}"
            self._end_launch(message)
            raise LaunchError(message) from None
        finally:
            os.close(report_w)
            os.close(stdin_r)
        self._send_launch(run_as, report_r)

    def _send_launch(self, run_as: RunAs | None, report_r: int) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self._to_shim = self.proc.stdin.fileno()
        self._from_shim = report_r
        launch = {"argv": list(self.record.spec.command), "cwd": self.record.spec.cwd, "env": self._job_env(run_as)}
        with contextlib.suppress(OSError):  # the shim is gone: _await_ready says so
            self._write_all(f"launch {json.dumps(launch)}\n".encode(), time.monotonic() + SHIM_ANSWER_S)
        os.set_blocking(self._to_shim, False)  # from now on a shim that does not read never blocks us

    def _job_env(self, run_as: RunAs | None) -> dict[str, str]:
        return self.environment() | (run_as.environment() if run_as else {})

    def _write_all(self, data: bytes, deadline: float) -> None:
        os.set_blocking(self._to_shim, False)
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the job's launcher does not read its input")
            select.select([], [self._to_shim], [], remaining)
            try:
                view = view[os.write(self._to_shim, view) :]
            except BlockingIOError:
                continue

    def _await_ready(self, deadline: float | None = None) -> str:
        """The shim's first word: `ready <pid>`, or `fail <why>`, or why there is none."""
        deadline = time.monotonic() + SHIM_ANSWER_S if deadline is None else deadline
        while True:
            for line in self._read_report(max(0.0, deadline - time.monotonic())):
                if line.startswith(("ready ", "fail ")):
                    return line
            if self._from_shim < 0:
                assert self.proc is not None
                code = self.proc.wait()
                return f"the job's launcher exited before starting it ({_describe(code)}); see the job's log"
            if time.monotonic() >= deadline:
                return f"the job's launcher did not answer within {SHIM_ANSWER_S:.0f}s"

    def _read_report(self, timeout: float | None) -> list[str]:
        """Lines from the shim within `timeout`; at EOF the pipe is closed (`_from_shim` < 0)."""
        if self._from_shim < 0:
            return []
        readable, _, _ = select.select([self._from_shim], [], [], timeout)
        if not readable:
            return []
        data = os.read(self._from_shim, 65536)
        if not data:
            os.close(self._from_shim)
            self._from_shim = -1
            data = b"\n" if self._report else b""
        self._report += data
        *lines, self._report = self._report.split(b"\n")
        return [line.decode(errors="replace") for line in lines if line]

    def _send(self, line: str) -> bool:
        """One line to the shim, never blocking: a shim that does not read loses it."""
        with self._pipe_lock:
            if self._to_shim < 0:
                return False
            try:
                os.write(self._to_shim, (line + "\n").encode())
                return True
            except OSError:  # full (the shim is stopped) or gone
                return False

    def lease_renewed(self, before: float) -> None:
        """The job's lease in Redis lasts at least until `before` + ttl: tell the shim."""
        self._send(f"lease {before!r}")

    def _abort_shim(self) -> None:
        """Before "go": close its input (EOF = do not start) and stop it."""
        with self._pipe_lock:
            if self.proc is not None and self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            self._to_shim = -1
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHIM_ANSWER_S)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
        if self._from_shim >= 0:
            os.close(self._from_shim)
            self._from_shim = -1

    def _not_started(self, message: str) -> NoReturn:
        """Nothing of the job ran (its shim never opened the gate): it waits again."""
        self.record_end(lifecycle.not_started(self.writer, message, self.config.scheduler.max_requeues), False)
        self.done.set()
        raise LaunchError(message)

    def _end_launch(self, message: str) -> None:
        """The job could not start (still ASSIGNED): it fails with LaunchFailed."""
        ending = lifecycle.launch_failed(self.writer, JobState.ASSIGNED, message, time.time())
        self.record_end(ending, False)
        self.done.set()

    def _log_line(self, text: str) -> None:
        """A line from gpulab in the job's log (the log is ours to write: under the state dir)."""
        run_as = self.run_as
        with contextlib.suppress(OSError):
            uid, gid = (run_as.uid, run_as.gid) if run_as else (None, None)
            fd = jobfiles.open_log(self.config.state_dir, f"{self.job_id}.log", uid, gid)
            try:
                os.write(fd, (text + "\n").encode(errors="replace"))
            finally:
                os.close(fd)

    # ---- stop ---------------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        """Ask the shim to SIGTERM the whole tree now; SIGKILL follows after the grace period
        (the shim's, and this worker's own in case the shim does not). Idempotent. Before
        the command was released, the start sees the reason and never releases it."""
        with self._lock:
            first = not self._stop_reason
            if first:
                self._stop_reason = why
            proc = self.proc if self._gate_open else None
        if proc is None or not first:
            return
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)  # the shim forwards it to every process of the job
        timer = threading.Timer(self.config.worker.kill_grace_s, self._force_kill)
        timer.daemon = True
        timer.start()

    def _force_kill(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for pid in tree_pids(proc.pid) - {proc.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        timer = threading.Timer(FINAL_KILL_AFTER_S, self._kill_shim)
        timer.daemon = True
        timer.start()

    def _kill_shim(self) -> None:
        """The shim did not finish after its tree was killed (stopped or stuck): it goes too."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)

    # ---- watch and finish -----------------------------------------------------------------------
    def _watch(self) -> None:
        assert self.proc is not None
        limit = self.record.spec.time_limit_s
        while self._from_shim >= 0:
            remaining = None if limit is None else self.started_at + limit - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.stop("timeout")
                limit = None  # keep waiting for the tree to go; the kill timers follow
                continue
            for line in self._read_report(remaining):
                self._on_report(line)
        returncode = self.proc.wait()  # the shim closes its report pipe only by exiting
        self._sweep()
        with self._pipe_lock:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            self._to_shim = -1
        try:
            self.before_finish(self)
        except Exception:
            log.warning("worker: could not publish the heartbeat after job %s ended", self.job_id, exc_info=True)
        try:
            self._finish(returncode)
        except Exception:
            log.exception("worker: could not record the end of job %s", self.job_id)
        finally:
            self.done.set()

    def _on_report(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "started":
            self.started = True
        elif word == "fail":
            self.fail_message = rest
            self._log_line(f"gpulab: {rest}")
        elif word == "ended":
            self.ended_unasked = True
        elif word == "lost":
            self.lost_message = rest
            log.warning("worker: job %s stopped by its shim: %s", self.job_id, rest)

    def track(self, pids: set[int]) -> None:
        """Remember the tree's members (each heartbeat), so whatever outlives the shim (it was
        killed) is still found and killed when the job ends."""
        for pid in pids - set(self._known):
            with contextlib.suppress(psutil.Error):
                self._known[pid] = psutil.Process(pid).create_time()

    def _sweep(self) -> None:
        """After the shim exited: nothing of the job may survive it."""
        for pid, created in list(self._known.items()):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created and pid != os.getpid():
                    proc.kill()
        if self.job_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.job_pid, signal.SIGKILL)
        if isinstance(self.proc, subprocess.Popen):
            # (A served shim was reaped by its server: its pid may already be another's.)
            signal_tree(self.proc.pid, signal.SIGKILL)

    def read_status(self) -> dict[str, Any] | None:
        """The job's own status file (training progress), cleaned, when it changed since last read."""
        found = jobfiles.read_status_file(self.status_path, self.record.uid, self._status_mtime)
        if found is None:
            return None
        self._status_mtime = found[0]
        return found[1]

    def _log_tail(self) -> bytes:
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return b""
        with os.fdopen(fd, "rb") as f:
            try:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return f.read(LOG_TAIL_BYTES)
            except OSError:
                return b""

    def _finish(self, returncode: int) -> None:
        now = time.time()
        if self.lost_message and not self._stop_reason:
            self._stop_reason = "lease"  # the shim heard no renewal: the lease may be gone
        if self.fail_message:
            self.record_end(lifecycle.launch_failed(self.writer, JobState.RUNNING, self.fail_message, now), False)
            return
        if not self.started:
            self._finish_unstarted(returncode, now)
            return
        if self.ended_unasked:
            # A stop that arrived after the command had exited (the worker was frozen and
            # then saw its lease gone, or a cancel raced the end) does not change the result.
            self._stop_reason = ""
        self._status_mtime = 0
        status = self.read_status()
        outcome = classify(
            returncode,
            cancelled=self._stop_reason == "cancelled",
            timed_out=self._stop_reason == "timeout",
            lease_lost=self._stop_reason in ("lease", "fenced"),
            status=status,
            log_tail=self._log_tail(),
        )
        if self._stop_reason.startswith(MEMORY_STOP):
            # Stopped over its request while a co-tenant was at risk: out of memory, as Slurm
            # calls a job its cgroup killed (and --oom-retry applies), however it exited.
            outcome = Outcome(
                JobState.FAILED, Reason.OOM, self._stop_reason.removeprefix(MEMORY_STOP), outcome.exit_code
            )
        sample = self._profile_sample(outcome, status, now)
        fields: dict[str, Any] = {
            "exit_code": outcome.exit_code,
            "peak_bytes": self.peak,
            "current_bytes": {},
        }
        if status is not None:
            fields["status"] = status
        if self._stop_reason == "idle" and outcome.state != JobState.COMPLETED:
            idle_for = duration(self.config.policy.idle_after_s)
            detail = f"stopped: idle on its GPUs for {idle_for}; `gpulab release` runs it again"
            self.record_end(lifecycle.idle_stopped(self.writer, detail, fields), False)
            return
        if self._stop_reason == "preempted" and outcome.state != JobState.COMPLETED:
            # Back to wait, whatever the exit: a job that ignored SIGTERM was killed after the
            # grace period and resumes from whatever checkpoint it last wrote.
            how = "checkpointed and stopped" if self.record.spec.kind == "training" else "stopped"
            detail = f"preempted for job {self.preempted_for}; {how} ({outcome.detail or 'exit code 0'})"
            self.record_end(lifecycle.preempted(self.writer, detail, fields), False)
            return
        retry = self._oom_retry(outcome, status)
        if retry is not None:
            target, outcome = retry[0].state, retry[0]
            fields.update(retry[1])
        else:
            target, outcome = self._requeue_or_final(outcome)
        ending = lifecycle.finish(self.writer, target, outcome.reason, outcome.detail, fields, now)
        # Only a job that ended on its own has a result worth keeping over a requeue.
        ended_on_its_own = not self._stop_reason and target in (JobState.COMPLETED, JobState.FAILED)
        self.record_end(ending, ended_on_its_own)
        if sample is not None and self.record_profile is not None:
            # After the end is journaled and applied: learning data never delays the record of
            # how the job ended (a reader may see the end a moment before the run in its profile).
            self.record_profile(self, sample)

    def _gpu_size(self) -> int | None:
        return min((self.gpu_totals[u] for u in self.gpu_uuids if u in self.gpu_totals), default=None)

    def _plausible(self, status: dict[str, Any] | None, key: str) -> int | None:
        """A byte count the job wrote in its status file, if it could be true: no process
        holds more than its GPU has (or than any request could be)."""
        claimed = jobfiles.status_number(status, key)
        limit = self._gpu_size() or MAX_MEM_BYTES
        return int(claimed) if claimed is not None and 0 <= claimed <= limit else None

    def _profile_sample(self, outcome: Outcome, status: dict[str, Any] | None, now: float) -> Sample | None:
        """This attempt's run for its learned profile: only runs whose peak says what the job
        needs (it completed, ran to its time limit, or ran out of memory: a lower bound). A
        cancelled, failed or lost run may have stopped before its peak. The peak is the
        worker's own measurement; the allocator's figure from the job's status file is taken
        only where it is plausible, and can only raise the job's own future requests."""
        if not self.record.profile_key:
            return None
        oom = outcome.reason == Reason.OOM
        if outcome.state != JobState.COMPLETED and outcome.reason != Reason.TIMEOUT and not oom:
            return None
        measured = max(self.peak.values(), default=0)
        allocator = self._plausible(status, "peak_bytes")
        estimate = self.record.spec.mem_estimate
        if estimate is None:
            estimate = self._plausible(status, "mem_estimate_bytes")
        return Sample(
            job_id=self.job_id,
            attempt=self.attempt,
            peak=max(measured, allocator or 0),
            at=now,
            request=self.record.spec.mem_bytes,
            oom=oom,
            allocator_peak=allocator,
            estimate=estimate,
            label=self.record.profile_label,
        )

    def memory_warning(self, detail: str) -> None:
        """Over its request while a co-tenant is at risk: say so in the job's own log."""
        self.mem_warning = detail
        self._log_line(f"gpulab: {detail}")

    def _finish_unstarted(self, returncode: int, now: float) -> None:
        """RUNNING in Redis, but the shim never reported the command started. If it never
        released it (no "go" sent, or the shim gave up waiting for it), the command never ran:
        it may run again whatever its spec says (held after max_requeues, so a node that
        cannot start anything does not spin it). Released but unconfirmed (the shim died just
        then), it may have run for an instant: treated as a lost node."""
        stop = self._stop_reason
        why = STOP_WHY.get(stop, stop) or f"its launcher exited ({_describe(returncode)})"
        fields: dict[str, Any] = {"current_bytes": {}}
        if stop == "cancelled":
            detail = "cancelled before it started"
            ending = lifecycle.finish(self.writer, JobState.CANCELLED, Reason.CANCELLED, detail, fields, now)
        elif not self._gate_open or returncode == ABORTED_EXIT:
            held = lifecycle.held_after_unstarted(self.attempt, self.config.scheduler.max_requeues)
            target, reason = (JobState.HELD, Reason.HELD) if held else (JobState.PENDING, Reason.REQUEUED)
            detail = f"not started: {why}" + (f"; held after {self.attempt} attempts" if held else "")
            ending = lifecycle.finish(self.writer, target, reason, detail, fields, now)
        else:
            target, reason, detail = lifecycle.after_node_loss(
                self.record.spec, self.attempt, self.config.scheduler.max_requeues, why
            )
            ending = lifecycle.finish(self.writer, target, reason, detail, fields, now)
        self.record_end(ending, False)

    def _oom_retry(self, outcome: Outcome, status: dict[str, Any] | None) -> tuple[Outcome, dict[str, Any]] | None:
        """`--oom-retry N`: after a CUDA OOM, queue the job again asking for 1.25x the most it
        was seen to hold (NVML by process tree, or torch's own peak), up to N times. The
        job's own figure is capped to its GPU's size, and the new spec must validate: a
        retry that cannot fit or is not a valid request fails the job with the reason."""
        spec = self.record.spec
        if outcome.reason != Reason.OOM or spec.mem_bytes is None or self.record.oom_retries >= spec.oom_retry:
            return None  # (a whole-GPU job already had all there is)
        gpu_size = min((self.gpu_totals[u] for u in self.gpu_uuids if u in self.gpu_totals), default=None)
        claimed = jobfiles.status_number(status, "peak_bytes") or 0.0
        if not 0 <= claimed <= (gpu_size if gpu_size is not None else MAX_MEM_BYTES):
            # No process holds more than its GPU has: the job's figure is not to be believed.
            size = format_size(gpu_size) if gpu_size is not None else "any GPU's"
            detail = f"CUDA out of memory; not retried: its status file claims a {claimed:.4g}-byte peak, over {size}"
            return Outcome(JobState.FAILED, Reason.OOM, detail, outcome.exit_code), {}
        seen = max([*self.peak.values(), int(claimed), spec.mem_bytes])
        raised = -(-int(seen * OOM_RETRY_GROWTH) // MiB) * MiB  # round up to whole MiB
        # The most the scheduler places on this GPU (it keeps a headroom free): asking more
        # would leave the retry waiting forever as Infeasible.
        offered = None if gpu_size is None else (gpu_size - self.config.scheduler.headroom_bytes) // MiB * MiB
        if offered is not None and raised > offered:
            if spec.mem_bytes >= offered:
                detail = f"CUDA out of memory with all its GPU offers ({format_size(offered)}); not retried"
                return Outcome(JobState.FAILED, Reason.OOM, detail, outcome.exit_code), {}
            raised = offered
        retries = self.record.oom_retries + 1
        new_spec = replace(spec, mem_bytes=raised)
        try:
            validate_spec(new_spec)
        except SpecError as exc:
            detail = f"CUDA out of memory; cannot retry with --mem {format_size(raised)}: {exc}"
            return Outcome(JobState.FAILED, Reason.OOM, detail, outcome.exit_code), {}
        detail = f"CUDA out of memory; retry {retries}/{spec.oom_retry} with --mem {format_size(raised)}"
        origin = f"{format_size(raised)} after running out of memory: 1.25 x {format_size(seen)}"
        fields = {"spec": new_spec.to_json(), "oom_retries": retries, "mem_origin": origin}
        return Outcome(JobState.PENDING, Reason.REQUEUED, detail, outcome.exit_code), fields

    def _requeue_or_final(self, outcome: Outcome) -> tuple[JobState, Outcome]:
        """A job that died of a signal, or whose node or GPU went away, runs again if it asked to."""
        stop = self._stop_reason
        node_gone = stop in ("shutdown", "lease", "fenced") or stop.startswith("gpu lost")
        why = STOP_WHY.get(self._stop_reason, self._stop_reason) or outcome.detail
        if self.lost_message and stop == "lease":
            why = f"stopped by its shim: {self.lost_message}"
        if outcome.state == JobState.COMPLETED or not (
            node_gone or (self.record.spec.requeue and outcome.reason == Reason.SIGNAL)
        ):
            return outcome.state, outcome
        target, reason, detail = lifecycle.after_node_loss(
            self.record.spec, self.attempt, self.config.scheduler.max_requeues, why
        )
        return target, Outcome(target, reason, detail, outcome.exit_code)

    # ---- memory ---------------------------------------------------------------------------------
    def observe(self, uuid: str, used: int) -> None:
        """Record what the job's process tree holds on one of its GPUs now."""
        self.current[uuid] = used
        self.peak[uuid] = max(self.peak.get(uuid, 0), used)
        request = self.record.spec.mem_bytes
        if request is not None and used > request and not self.mem_warning:
            self.mem_warning = f"uses {format_size(used)} on GPU {uuid}, more than its --mem {format_size(request)}"


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _reported_child(answer: str, shim: subprocess.Popen[bytes] | ServedShim | None) -> int | None:
    """The pid in the shim's `ready <pid>`, only if it is a live direct child of that shim:
    the worker later signals it as root, so a pid a job could have slipped in (another
    user's process, 0, -1) is refused."""
    parts = answer.split()
    if shim is None or len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) <= 1:
        return None
    pid = int(parts[1])
    try:
        return pid if psutil.Process(pid).ppid() == shim.pid else None
    except psutil.Error:
        return None


def _pid_gone(answer: str) -> bool:
    parts = answer.split()
    return len(parts) == 2 and parts[1].isdigit() and not psutil.pid_exists(int(parts[1]))
