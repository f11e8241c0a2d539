"""The worker daemon: takes launches from its node's RQ queue and supervises the jobs.

Threads: RQ's SimpleWorker loop in the main thread (it runs `worker.tasks.launch` in this
process, which starts the job and returns at once, so one worker runs many jobs); a monitor
that every heartbeat probes the GPUs, attributes memory to jobs by process tree, publishes
the heartbeat and renews leases; a control thread that receives cancels. This process never
creates a CUDA context: NVML only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections import defaultdict

import psutil
import redis

from jobs import keys
from jobs.config import Config
from jobs.gpus import JobGpuUsage, NodeHeartbeat
from jobs.lifecycle import Fence
from jobs.states import JobState
from jobs.store import Fenced, JobStore, TransitionRefused
from worker.probe import GpuProbe
from worker.process_tree import tree_pids
from worker.runner import JobRunner, LaunchError

log = logging.getLogger("gpulab.worker")


class NodeNameTaken(RuntimeError):
    pass


class WorkerDaemon:
    def __init__(self, config: Config, client: redis.Redis, probe: GpuProbe, node: str, *, simulated: bool) -> None:
        self.config = config
        self.redis = client
        self.store = JobStore(client)
        self.probe = probe
        self.node = node
        self.simulated = simulated
        self.runners: dict[int, JobRunner] = {}
        self.foreign_peak: dict[tuple[str, int], int] = {}  # (uuid, pid) -> peak bytes
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.fence = Fence(keys.node_epoch(node), "")  # the real token comes with the name
        self.fenced = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._claim_name()
        self.publish_heartbeat()
        self.store.wake_scheduler()  # a new node may fit waiting jobs
        for target, name in ((self._monitor_loop, "monitor"), (self._control_loop, "control")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _claim_name(self) -> None:
        """Two workers under one node name would take each other's launches: refuse, unless
        the holder was an earlier worker on this very host that has died (a crash restart),
        or its claim lapsed (a frozen or cut-off worker). Taking the name bumps the node's
        epoch: the new token fences every write of the previous holder."""
        self._take_name()
        self.fence = Fence(keys.node_epoch(self.node), str(self.redis.incr(keys.node_epoch(self.node))))

    def _take_name(self) -> None:
        key = keys.node_owner(self.node)
        ttl_ms = int(self.config.worker.lease_ttl_s * 1000)
        if self.redis.set(key, self.owner, nx=True, px=ttl_ms):
            return
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                holder = raw.decode() if raw else ""
                if raw is None or _dead_local_owner(holder):
                    pipe.multi()
                    pipe.set(key, self.owner, px=ttl_ms)
                    pipe.execute()
                    return
            except redis.WatchError:
                holder = "another worker starting just now"
        raise NodeNameTaken(
            f"node name '{self.node}' is in use by worker {holder}; "
            "pick another with --name or wait for its lease to expire"
        )

    def shutdown(self) -> None:
        """Stop every job (requeued or failed as NodeLost, per its spec) and leave cleanly."""
        self.stopping.set()
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop("shutdown")
        for runner in runners:
            runner.done.wait(self.config.worker.kill_grace_s + 5)
        for thread in self._threads:
            thread.join(timeout=5)
        pipe = self.redis.pipeline(transaction=False)
        if not self.fenced.is_set():  # a fenced worker's node belongs to its successor
            pipe.delete(keys.node(self.node), keys.node_owner(self.node))
        pipe.lpush(keys.WAKE, "node-down")
        pipe.execute()
        self.probe.close()

    # ---- launch (called by RQ in the main thread) -------------------------------------------------
    def launch(self, job_id: int, attempt: int) -> str:
        record = self.store.get(job_id)
        if record is None or record.state != JobState.ASSIGNED or record.attempt != attempt or record.node != self.node:
            return f"skipped: job {job_id} attempt {attempt} is no longer assigned here"
        if self.fenced.is_set() or self.redis.get(self.fence.key) != self.fence.token.encode():
            self._on_fenced()
            return f"skipped: job {job_id}: this worker was fenced off node {self.node}"
        runner = JobRunner(
            record,
            self.config,
            self.store,
            self.node,
            simulated=self.simulated,
            before_finish=self._before_finish,
            fence=self.fence,
        )
        with self._lock:
            self.runners[job_id] = runner
        try:
            runner.start()
        except TransitionRefused as exc:
            self._forget(runner)
            return f"skipped: {exc}"
        except LaunchError as exc:
            self._forget(runner)
            return f"failed: {exc}"
        return f"started job {job_id} pid {runner.pid}"

    def _before_finish(self, runner: JobRunner) -> None:
        # Publish the GPUs as they are after the exit before the finish wakes the scheduler,
        # so the next pass sees the memory back instead of a stale snapshot.
        self._forget(runner)
        self.publish_heartbeat()

    def _forget(self, runner: JobRunner) -> None:
        with self._lock:
            self.runners.pop(runner.job_id, None)

    # ---- monitor -------------------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        interval = self.config.worker.heartbeat_interval_s
        while not self.stopping.wait(interval):
            try:
                self.publish_heartbeat()
            except redis.RedisError as exc:
                log.warning("worker: heartbeat failed (%s); jobs keep running", exc)
            except Exception:
                log.exception("worker: heartbeat error")

    def publish_heartbeat(self) -> None:
        """Renew leases first (they keep jobs alive), then measure and publish the GPUs."""
        with self._beat_lock:
            with self._lock:
                runners = list(self.runners.values())
            running = [r for r in runners if r.pid is not None and not r.done.is_set()]
            try:
                lost = self.store.renew_leases(
                    [r.job_id for r in running], self.node, self.config.worker.lease_ttl_s, self.fence
                )
            except Fenced:
                self._on_fenced()
                return
            self._stop_lost(lost)
            beat = self._measure(runners)
            ttl_ms = int(self.config.worker.lease_ttl_s * 1000)
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(keys.node(self.node), json.dumps(beat.to_json()), px=ttl_ms)
            pipe.set(keys.node_owner(self.node), self.owner, px=ttl_ms)
            pipe.sadd(keys.NODES, self.node)
            for runner in running:
                fields: dict[str, object] = {"current_bytes": runner.current, "peak_bytes": runner.peak}
                if runner.mem_warning:
                    fields["mem_warning"] = runner.mem_warning
                status = runner.read_status()
                if status is not None:
                    fields["status"] = status
                self.store.observe(pipe, runner.job_id, runner.attempt, self.fence, fields)
            pipe.execute()

    def _on_fenced(self) -> None:
        """Another worker took this node's name while this one was frozen or cut off: every
        job here may already run there. Stop them all (their outcomes are refused: the
        successor and the scheduler decide) and leave."""
        if self.fenced.is_set():
            return
        self.fenced.set()
        log.error("worker: node %s was taken over by another worker; stopping every job here and exiting", self.node)
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop("fenced")
        os.kill(os.getpid(), signal.SIGTERM)  # RQ's warm shutdown, then shutdown() below

    def _stop_lost(self, lost: list[int]) -> None:
        for job_id in lost:
            # The scheduler may already have given this job to another node: never run it twice.
            log.warning("worker: lost the lease of job %s; stopping it", job_id)
            with self._lock:
                runner = self.runners.get(job_id)
            if runner is not None:
                runner.stop("lease")

    def _measure(self, runners: list[JobRunner]) -> NodeHeartbeat:
        snapshot = self.probe.snapshot()
        owner: dict[int, JobRunner] = {}
        for runner in runners:
            if runner.pid is not None:
                for pid in tree_pids(runner.pid):
                    owner[pid] = runner
        usage: list[JobGpuUsage] = []
        foreign_now: dict[tuple[str, int], int] = {}
        for device in snapshot.devices:
            if not device.healthy:
                # The card is gone or unreadable: its jobs cannot be trusted to make progress.
                for runner in runners:
                    if device.uuid in runner.gpu_uuids:
                        runner.stop(f"gpu lost: GPU {device.index} ({device.error})")
            per_job: dict[JobRunner, int] = defaultdict(int)
            for proc in device.processes:
                holder = owner.get(proc.pid)
                if holder is not None and device.uuid in holder.gpu_uuids:
                    per_job[holder] += proc.used_bytes
                else:  # not gpulab's, or a job on a GPU it was not given: held at its peak
                    foreign_now[(device.uuid, proc.pid)] = proc.used_bytes
            for runner in runners:
                if device.uuid in runner.gpu_uuids:
                    runner.observe(device.uuid, per_job.get(runner, 0))
                    usage.append(
                        JobGpuUsage(runner.job_id, device.uuid, runner.current[device.uuid], runner.peak[device.uuid])
                    )
        # Outside processes are held at their peak until they exit (they leave the list).
        self.foreign_peak = {k: max(v, self.foreign_peak.get(k, 0)) for k, v in foreign_now.items()}
        foreign_by_gpu: dict[str, int] = defaultdict(int)
        for (uuid, _pid), peak in self.foreign_peak.items():
            foreign_by_gpu[uuid] += peak
        return NodeHeartbeat(self.node, snapshot, tuple(usage), dict(foreign_by_gpu), False, time.time())

    # ---- control -------------------------------------------------------------------------------
    def _control_loop(self) -> None:
        key = keys.node_control(self.node)
        while not self.stopping.is_set():
            try:
                item = self.redis.blpop([key], timeout=1)
            except redis.RedisError:
                self.stopping.wait(1)
                continue
            if item is None:
                continue
            parts = item[1].decode().split()
            if len(parts) == 3 and parts[0] == "cancel":
                with self._lock:
                    runner = self.runners.get(int(parts[1]))
                if runner is not None and runner.attempt == int(parts[2]):
                    runner.stop("cancelled")


def _dead_local_owner(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))
