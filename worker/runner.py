"""One job's process on this node: start it, watch it, stop it, record how it ended.

The process runs from argv (no shell), in its own process group, with the assigned GPUs
in CUDA_VISIBLE_DEVICES (as UUIDs, with PCI bus order) and stdout+stderr in the job's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from jobs import lifecycle
from jobs.config import Config
from jobs.lifecycle import Attempt, Fence, Transition
from jobs.record import JobRecord
from jobs.sizes import MiB, format_size
from jobs.states import JobState, Reason
from jobs.store import JobStore, TransitionRefused
from worker.identity import IdentityError, resolve_run_as
from worker.outcome import Outcome, classify
from worker.process_tree import kill_group, signal_tree

log = logging.getLogger("gpulab.worker")
LOG_TAIL_BYTES = 64 * 1024
OOM_RETRY_GROWTH = 1.25


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
        store: JobStore,
        node: str,
        *,
        simulated: bool,
        before_finish: Callable[[JobRunner], None],
        fence: Fence | None = None,
    ) -> None:
        self.record = record
        self.job_id = record.id
        self.attempt = record.attempt
        self.writer = Attempt(record.id, record.attempt, node, fence)
        self.config = config
        self.store = store
        self.node = node
        self.simulated = simulated
        self.before_finish = before_finish
        self.gpu_uuids = [g.uuid for g in record.gpus]
        self.log_path = config.log_dir / f"{record.id}.log"
        self.run_dir = config.state_dir / "run" / str(record.id)
        self.status_path = self.run_dir / "status.json"
        self.checkpoint_dir = config.checkpoint_root / str(record.id)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.peak: dict[str, int] = {}
        self.current: dict[str, int] = {}
        self.mem_warning = ""
        self._stop_reason = ""  # "cancelled" | "timeout" | "lease" | "shutdown" | "gpu lost: ..."
        self._lock = threading.Lock()
        self._status_mtime = 0.0
        self.done = threading.Event()

    @property
    def pid(self) -> int | None:
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
        """Start the process, then mark the job RUNNING with its pid and lease in one step.

        If the job was cancelled or moved while we started it, the process is killed at once
        (TransitionRefused propagates). Raises LaunchError if the program cannot start.
        """
        spec = self.record.spec
        try:
            run_as = resolve_run_as(self.record.uid)
        except IdentityError as exc:
            self._end_launch(JobState.ASSIGNED, str(exc))
            raise LaunchError(str(exc)) from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.status_path.unlink(missing_ok=True)
        self.log_path.touch(mode=0o600)
        if run_as is not None:  # the job's files belong to its owner, readable by nobody else
            run_as.own(self.log_path, 0o600)
            run_as.own(self.run_dir, 0o700)
            run_as.own(self.checkpoint_dir, 0o700)
        env = self.environment() | (run_as.environment() if run_as else {})
        with open(self.log_path, "ab") as log_file:
            if self.attempt > 1:
                log_file.write(f"=== gpulab: job {self.job_id} attempt {self.attempt} on {self.node} ===\n".encode())
                log_file.flush()
            try:
                with self._lock:
                    self.proc = subprocess.Popen(
                        list(spec.command),
                        cwd=spec.cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # own process group: stop it whole
                        close_fds=True,
                        user=run_as.uid if run_as else None,
                        group=run_as.gid if run_as else None,
                        extra_groups=list(run_as.groups) if run_as else None,
                        umask=0o022 if run_as else -1,
                    )
                    self.started_at = time.monotonic()
            except OSError as exc:
                message = f"cannot start {spec.command[0]!r} in {spec.cwd}: {exc.strerror or exc}"
                log_file.write(f"gpulab: {message}\n".encode())
                self._end_launch(JobState.ASSIGNED, message)
                raise LaunchError(message) from None
        try:
            started = lifecycle.start(
                self.writer, self.proc.pid, str(self.log_path), self.config.worker.lease_ttl_s, time.time()
            )
            self.store.transition(started)
        except TransitionRefused:
            signal_tree(self.proc.pid, 9)
            self.proc.wait()
            self.done.set()
            raise
        with self._lock:
            stop_now = self._stop_reason
        if stop_now:
            self._stop_reason = ""
            self.stop(stop_now)
        threading.Thread(target=self._watch, name=f"job-{self.job_id}", daemon=True).start()

    def _end_launch(self, state: JobState, message: str) -> None:
        with contextlib.suppress(TransitionRefused):
            self.store.transition(lifecycle.launch_failed(self.writer, state, message, time.time()))
        self.done.set()

    # ---- stop ---------------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        """SIGTERM the whole tree now, SIGKILL after the grace period. Idempotent."""
        with self._lock:
            first = not self._stop_reason
            if first:
                self._stop_reason = why
            proc = self.proc
        if proc is None or not first:
            return
        signal_tree(proc.pid, 15)
        timer = threading.Timer(self.config.worker.kill_grace_s, self._force_kill)
        timer.daemon = True
        timer.start()

    def _force_kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_tree(self.proc.pid, 9)

    # ---- watch and finish -----------------------------------------------------------------------
    def _watch(self) -> None:
        assert self.proc is not None
        limit = self.record.spec.time_limit_s
        while True:
            remaining = None if limit is None else self.started_at + limit - time.monotonic()
            try:
                returncode = self.proc.wait(timeout=None if remaining is None else max(remaining, 0.0))
                break
            except subprocess.TimeoutExpired:
                self.stop("timeout")
                limit = None  # keep waiting for the process to go; the kill timer follows
        kill_group(self.proc.pid)  # leftovers of the group die with the job
        try:
            self.before_finish(self)
            self._finish(returncode)
        except Exception:
            log.exception("worker: could not record the end of job %s", self.job_id)
        finally:
            self.done.set()

    def read_status(self) -> dict[str, Any] | None:
        """The job's own status file (training progress), when it changed since last read."""
        try:
            mtime = self.status_path.stat().st_mtime
            if mtime == self._status_mtime:
                return None
            data = json.loads(self.status_path.read_text())
            self._status_mtime = mtime
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _log_tail(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return f.read()
        except OSError:
            return b""

    def _finish(self, returncode: int) -> None:
        self._status_mtime = 0.0
        status = self.read_status()
        outcome = classify(
            returncode,
            cancelled=self._stop_reason == "cancelled",
            timed_out=self._stop_reason == "timeout",
            lease_lost=self._stop_reason == "lease",
            status=status,
            log_tail=self._log_tail(),
        )
        fields: dict[str, Any] = {
            "exit_code": outcome.exit_code,
            "peak_bytes": self.peak,
            "current_bytes": {},
        }
        if status is not None:
            fields["status"] = status
        retry = self._oom_retry(outcome, status)
        if retry is not None:
            target, outcome = JobState.PENDING, retry[0]
            fields.update(retry[1])
        else:
            target, outcome = self._requeue_or_final(outcome)
        ending = lifecycle.finish(self.writer, target, outcome.reason, outcome.detail, fields, time.time())
        try:
            self.store.transition(ending)
        except TransitionRefused as exc:
            # Only a job that ended on its own has a result worth keeping over a requeue.
            ended_on_its_own = not self._stop_reason and target in (JobState.COMPLETED, JobState.FAILED)
            if exc.current == JobState.PENDING.value and ended_on_its_own:
                self._late_finish(ending)
            else:
                log.warning("worker: job %s ended but was already moved on (%s)", self.job_id, exc)

    def _late_finish(self, ending: Transition) -> None:
        """Our lease lapsed just as the job ended and the scheduler requeued this attempt:
        record the result anyway (same attempt, not yet dispatched again) so it is not re-run."""
        try:
            self.store.transition(lifecycle.late_finish(ending, self.node))
        except TransitionRefused as exc:
            log.warning("worker: job %s finished after it was dispatched again (%s)", self.job_id, exc)

    def _oom_retry(self, outcome: Outcome, status: dict[str, Any] | None) -> tuple[Outcome, dict[str, Any]] | None:
        """`--oom-retry N`: after a CUDA OOM, queue the job again asking for 1.25x the most it
        was seen to hold (NVML by process tree, or torch's own peak), up to N times."""
        spec = self.record.spec
        if outcome.reason != Reason.OOM or spec.mem_bytes is None or self.record.oom_retries >= spec.oom_retry:
            return None  # (a whole-GPU job already had all there is)
        seen = max([*self.peak.values(), int((status or {}).get("peak_bytes") or 0), spec.mem_bytes or 0])
        raised = -(-int(seen * OOM_RETRY_GROWTH) // MiB) * MiB  # round up to whole MiB
        retries = self.record.oom_retries + 1
        detail = f"CUDA out of memory; retry {retries}/{spec.oom_retry} with --mem {format_size(raised)}"
        new_spec = replace(spec, mem_bytes=raised)
        fields = {"spec": new_spec.to_json(), "oom_retries": retries}
        return Outcome(JobState.PENDING, Reason.REQUEUED, detail, outcome.exit_code), fields

    def _requeue_or_final(self, outcome: Outcome) -> tuple[JobState, Outcome]:
        """A job that died of a signal, or whose node or GPU went away, runs again if it asked to."""
        stop = self._stop_reason
        node_gone = stop in ("shutdown", "lease", "fenced") or stop.startswith("gpu lost")
        why = STOP_WHY.get(self._stop_reason, self._stop_reason) or outcome.detail
        if outcome.state == JobState.COMPLETED or not (node_gone or (self.record.spec.requeue and outcome.reason == Reason.SIGNAL)):
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
