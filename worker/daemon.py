"""The worker daemon: takes launches from its node's RQ queue and supervises the jobs.

Threads: RQ's SimpleWorker loop in the main thread (it runs `worker.tasks.launch` in this
process, which starts the job and returns at once, so one worker runs many jobs); a monitor
that every heartbeat renews leases (and tells each job's shim, which kills its job itself
when it stops hearing renewals), probes the GPUs, attributes memory to jobs by process
tree and publishes the heartbeat; a control thread that receives cancels; a journal thread
that records job ends Redis could not take when they happened. This process never creates
a CUDA context: NVML only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict

import psutil
import redis

from jobs import keys, scripts
from jobs.config import Config
from jobs.daemons import LastWords
from jobs.gpus import GpuSnapshot, JobGpuUsage, NodeHeartbeat
from jobs.lifecycle import Fence, Transition
from jobs.notify_events import emit
from jobs.profiles import Sample
from jobs.record import JobRecord
from jobs.redis_conn import queue_script
from jobs.states import JobState, Reason
from jobs.store import Fenced, JobStore, TransitionRefused
from jobs.text import duration
from worker.enforcement import Enforcer, GpuState, JobOnGpu
from worker.identity import RunAs
from worker.journal import EndRecorder, Entry, Journal
from worker.logship import LogShipper
from worker.probe import GpuProbe
from worker.process_tree import CHILD_STARTS, children_by_parent, find_shims, kill_tree, sweep_orphans, tree_pids
from worker.runner import MEMORY_STOP, SHIM_ANSWER_S, SHIM_ENV, SHIM_PATH, JobRunner, LaunchError
from worker.shim import PR_SET_CHILD_SUBREAPER, prctl
from worker.shim_server import ShimServer

log = logging.getLogger("gpulab.worker")
STOP_CALL_S = 3.0  # each step of a stop that talks to Redis waits at most this long
STOP_CALL_AFTER_SILENCE_S = 0.5  # ... and once one went unanswered, each later one this long


def stop_words() -> LastWords:
    """The bounds of one stop's steps that talk to Redis (the worker's and RQ's)."""
    return LastWords(STOP_CALL_S, STOP_CALL_AFTER_SILENCE_S)


class NodeNameTaken(RuntimeError):
    pass


class GpuTaken(NodeNameTaken):
    """A GPU of this host is served by another live worker (another node name)."""


class WorkerDaemon:
    def __init__(self, config: Config, client: redis.Redis, probe: GpuProbe, node: str, *, simulated: bool) -> None:
        self.config = config
        self.redis = client
        self.store = JobStore(client)
        self.probe = probe
        self.node = node
        self.simulated = simulated
        self.runners: dict[int, JobRunner] = {}
        # Jobs whose shim has exited and whose end is being made (orphans killed, GPUs
        # published, the end journaled): out of `runners`, but their leases are still renewed.
        self._ending: dict[int, JobRunner] = {}
        self.foreign_peak: dict[tuple[str, int], int] = {}  # (uuid, pid) -> peak bytes
        # What the last full heartbeat measured, for the light one after a job end.
        self._last_usage: tuple[JobGpuUsage, ...] = ()
        self._last_foreign: dict[str, int] = {}  # uuid -> peak bytes of outside processes
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()  # one heartbeat at a time
        self._beat_seq_lock = threading.Lock()
        self._beats_begun = 0  # heartbeats begun (counted under _beat_seq_lock)
        self._beats_done = 0  # the number of the last one published
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.fence = Fence(keys.node_epoch(node), "")  # the real token comes with the name
        self.fenced = threading.Event()
        self.draining = threading.Event()  # shutting down: offline, but jobs still stopping
        self._threads: list[threading.Thread] = []
        self.gpu_totals: dict[str, int] = {}
        self._shim_python: dict[tuple[int, int], str] = {}
        self._probes: set[int] = set()  # shim_python's self-checks running now (the sweep spares them)
        self._gpu_uuids: list[str] = []  # the GPUs this worker claimed (keys.gpu_owner)
        self._renew_gpu_claims = client.register_script(scripts.RENEW_GPU_CLAIMS)
        folder = config.state_dir / "worker" / re.sub(r"[^A-Za-z0-9._-]", "_", node) / "journal"
        self.ends = EndRecorder(self.store, Journal(folder), lambda: self.fence, self._on_fenced)
        self.logs = LogShipper(client, config)
        tags = ["--node", node, "--state-dir", str(config.state_dir)]
        self.shim_server = ShimServer(SHIM_PATH, SHIM_ENV, tags)  # started by the first launch
        memory = config.memory
        self.enforcer = Enforcer(memory.enforce, memory.enforce_grace_s, config.scheduler.headroom_bytes)

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        # A subreaper: a job process whose shim was killed (by the job itself: same uid) is
        # adopted by this worker instead of init, and killed by the next heartbeat.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._kill_stale_shims(orphans_only=True)
        self._claim_name()
        self._kill_stale_shims(orphans_only=False)
        self.ends.replay()  # a predecessor's unrecorded ends, before any launch
        self.publish_heartbeat()
        self.store.wake_scheduler()  # a new node may fit waiting jobs
        threads = (
            (self._monitor_loop, "monitor"), (self._control_loop, "control"), (self._journal_loop, "journal"),
            (lambda: self.logs.run(self.stopping), "logship"),
        )  # fmt: skip
        for target, name in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _kill_stale_shims(self, *, orphans_only: bool) -> None:
        """Jobs a previous worker of this node left on this host. Their shims die with their
        worker (PDEATHSIG) or when its renewals stop, so normally there are none; any left
        (their worker died just as they started) must not run beside their requeued copies.
        Before this worker holds the name, only orphans (whose worker is gone) are killed: a
        live holder would refuse the name to this one. After, none of them can be this one's."""
        found = find_shims(SHIM_PATH, self.node, str(self.config.state_dir))
        # A live worker's shims: its exec'd shims and its fork server (children of the worker),
        # and the shims that server forked (children of the server).
        held = {pid for pid, ppid, worker in found if ppid == worker and psutil.pid_exists(worker)}
        for pid, ppid, worker in found:
            if worker == os.getpid():
                continue
            if orphans_only and (pid in held or ppid in held):
                continue
            log.warning("worker: killing job shim %s left by worker %s of node %s", pid, worker, self.node)
            kill_tree(pid)

    def _claim_name(self) -> None:
        """Two workers under one node name would take each other's launches: refuse, unless
        the holder was an earlier worker on this very host that has died (a crash restart),
        or its claim lapsed (a frozen or cut-off worker). Taking the name bumps the node's
        epoch: the new token fences every write of the previous holder."""
        self._take_name()
        try:
            self._take_gpus()
        except (GpuTaken, redis.RedisError):
            with contextlib.suppress(redis.RedisError):  # the name is free again at once
                if self.redis.get(keys.node_owner(self.node)) == self.owner.encode():
                    self.redis.delete(keys.node_owner(self.node))
            raise
        self.fence = Fence(keys.node_epoch(self.node), str(self.redis.incr(keys.node_epoch(self.node))))

    @property
    def gpu_claim(self) -> str:
        return f"{self.node} {self.owner}"

    def _take_gpus(self) -> None:
        """One worker per physical GPU: two workers on one host under different names would
        each offer every GPU, and the scheduler would book each twice (OOMs). A GPU held by
        another node's live worker is refused; one held by this node's previous worker, or by
        a dead worker of this host, or whose claim lapsed, is taken."""
        uuids = sorted(d.uuid for d in self.probe.snapshot().devices)
        self._gpu_uuids = uuids
        if not uuids:
            return
        claims = [keys.gpu_owner(u) for u in uuids]
        ttl_ms = int(self.config.worker.lease_ttl_s * 1000)
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(*claims)
                for uuid, claim, raw in zip(uuids, claims, pipe.mget(claims), strict=True):
                    node, _, holder = (raw or b"").decode(errors="replace").partition(" ")
                    if raw is not None and node != self.node and not _dead_local_owner(holder):
                        # A claim without a TTL (written by hand, a restored dump) never lapses:
                        # say which key to delete, or the GPU stays blocked with no clue why.
                        left_ms = int(pipe.pttl(claim))
                        lapses = "it never lapses" if left_ms < 0 else f"it lapses within {left_ms / 1000:.1f}s"
                        raise GpuTaken(
                            f"GPU {uuid} is served by node '{node}' (worker {holder}; Redis key {claim}: "
                            f"{lapses}); one worker per GPU: stop that worker, or start this one under "
                            "its name (--name)"
                        )
                pipe.multi()
                for claim in claims:
                    pipe.set(claim, self.gpu_claim, px=ttl_ms)
                pipe.execute()
            except redis.WatchError:
                raise GpuTaken("another worker is claiming this host's GPUs just now; try again") from None

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

    def shutdown(self, last_words: LastWords | None = None) -> None:
        """Stop every job (requeued or failed as NodeLost, per its spec) and leave cleanly.

        The node goes offline first, so a requeued job is not dispatched straight back here;
        the monitor keeps renewing the stopping jobs' leases (their shims would otherwise
        kill them early, and the scheduler could run them elsewhere while they checkpoint)."""
        self.draining.set()
        # Each word to Redis here is bounded (jobs.daemons.LastWords): cut off from Redis, a stop
        # waited out every call's timeout and retries (52 s). What is not said expires: the
        # heartbeat with its TTL, the jobs' leases (the scheduler requeues them), and the ends
        # wait in the journal for the next worker of this node.
        last_words = last_words or stop_words()
        last_words.say([self._offline])
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop("shutdown")
        for runner in runners:
            runner.done.wait(self.config.worker.kill_grace_s + 10)
        self.stopping.set()
        self.shim_server.close()
        self.ends.wake()
        deadline = time.monotonic() + last_words.bound()  # a thread may wait on Redis
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # A last try at the journaled ends, then the node down; what Redis still cannot take
        # waits in the journal.
        if not last_words.say([self.ends.retry, self._mark_down]):
            log.warning("worker: Redis did not answer while stopping; ends left in the journal, node %s "
                        "marked down by its heartbeat's expiry", self.node)  # fmt: skip
        self.probe.close()

    def _offline(self) -> None:
        with self._beat_lock, contextlib.suppress(redis.RedisError):
            if not self.fenced.is_set():
                self.redis.delete(keys.node(self.node))

    def _mark_down(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            if not self.fenced.is_set():  # a fenced worker's node belongs to its successor
                pipe.delete(keys.node(self.node), keys.node_owner(self.node), *map(keys.gpu_owner, self._gpu_uuids))
            pipe.lpush(keys.WAKE, "node-down")
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("worker: could not mark node %s down (%s)", self.node, exc)

    # ---- launch (called by RQ in the main thread) -------------------------------------------------
    def launch(self, job_id: int, attempt: int) -> str:
        return self.launch_many([(job_id, attempt)])[0]

    def launch_many(self, launches: list[tuple[int, int]]) -> list[str]:
        """Start a batch of launches (one RQ job of worker/tasks.py); one result per launch.

        The same steps as JobRunner.start for each, each step for the whole batch at once: one
        read of the records and of this worker's fencing token; every shim spawned, then
        every `ready` awaited (they start side by side); one round trip of start transitions
        for the ready ones, each guarded as alone (ASSIGNED, its attempt, this worker's
        token); "go" only to those accepted, and only if not stopped meanwhile (checked
        under the runner's lock, as a cancel sets it). A refused one's shim is aborted: its
        command never runs. One launch that cannot start never keeps the others from it."""
        results: list[str | None] = [None] * len(launches)
        try:
            records, token = self.store.get_each_and([job_id for job_id, _ in launches], self.fence.key)
        except redis.RedisError as exc:
            # Not started, still ASSIGNED: the scheduler requeues them when the assignments lapse.
            log.warning("worker: could not read %d launches (%s); none was run", len(launches), exc)
            return [f"skipped: job {job_id}: Redis error at start ({exc})" for job_id, _ in launches]
        if self.fenced.is_set() or token != self.fence.token.encode():
            self._on_fenced()
            return [f"skipped: job {job_id}: this worker was fenced off node {self.node}" for job_id, _ in launches]
        batch: list[tuple[int, JobRunner]] = []  # (position in `launches`, its runner)
        for n, ((job_id, attempt), record) in enumerate(zip(launches, records, strict=True)):
            if isinstance(record, Exception):
                results[n] = f"failed: job {job_id}: {record}"
            elif (
                record is None or record.state != JobState.ASSIGNED or record.attempt != attempt
                or record.node != self.node or any(r.job_id == job_id for _, r in batch)
            ):  # fmt: skip
                results[n] = f"skipped: job {job_id} attempt {attempt} is no longer assigned here"
            else:
                batch.append((n, self._runner(record)))
        with self._lock:  # from now on a cancel finds them (and stops them before "go")
            self.runners.update({runner.job_id: runner for _, runner in batch})
        ready: list[tuple[int, JobRunner]] = []
        for n, runner in batch:
            try:
                runner.spawn()
            except Exception as exc:
                self._launch_failed(runner, exc, results, n)
            else:
                ready.append((n, runner))
        deadline = time.monotonic() + SHIM_ANSWER_S  # the shims start side by side
        starting: list[tuple[int, JobRunner, Transition]] = []
        for n, runner in ready:
            try:
                starting.append((n, runner, runner.await_start(deadline)))
            except Exception as exc:
                self._launch_failed(runner, exc, results, n)
        self._start_batch(starting, results)
        return [result or "failed: no result" for result in results]

    def _runner(self, record: JobRecord) -> JobRunner:
        return JobRunner(
            record,
            self.config,
            self.node,
            simulated=self.simulated,
            store_transition=self.store.transition,
            record_end=self._record_end,
            before_finish=self._before_finish,
            fence=self.fence,
            gpu_totals=self.gpu_totals,
            shim_python=self.shim_python,
            on_log_open=self.logs.add,
            record_profile=self._record_profile,
            shim_server=self.shim_server,
        )

    def _launch_failed(self, runner: JobRunner, exc: Exception, results: list[str | None], n: int) -> None:
        """One launch of a batch ends here; the others go on."""
        if isinstance(exc, LaunchError):  # its end is recorded (LaunchFailed, or waits again)
            results[n] = f"failed: {exc}"
        else:  # this one stays ASSIGNED: its lease lapses and it waits again
            log.error("worker: launch of job %s attempt %s failed", runner.job_id, runner.attempt, exc_info=exc)
            runner.withdraw()
            results[n] = f"failed: job {runner.job_id}: {exc}"
        self._forget(runner)

    def _start_batch(self, starting: list[tuple[int, JobRunner, Transition]], results: list[str | None]) -> None:
        """The start transitions of the ready launches in one round trip; "go" to the accepted."""
        if not starting:
            return
        before = time.monotonic()  # each lease set below lasts at least until before + ttl
        try:
            outcomes = self.store.transition_each([t for _, _, t in starting])
        except Exception as exc:
            # Not started (any that Redis took lapses to the reaper: its command never runs).
            log.warning("worker: could not start %d jobs (%s); none was run", len(starting), exc)
            outcomes = [exc] * len(starting)
        refused: list[JobRunner] = []
        fenced = False
        for (n, runner, _), outcome in zip(starting, outcomes, strict=True):
            if isinstance(outcome, str):
                try:
                    runner.release(before)
                    results[n] = f"started job {runner.job_id} pid {runner.job_pid}"
                except Exception as exc:  # (its watcher did not start: the lease lapses to the reaper)
                    log.exception("worker: job %s could not be released", runner.job_id)
                    results[n] = f"failed: job {runner.job_id}: {exc}"
                continue
            refused.append(runner)
            if isinstance(outcome, TransitionRefused):
                results[n] = f"skipped: {outcome}"
            elif isinstance(outcome, Fenced):
                fenced = True
                results[n] = f"skipped: job {runner.job_id}: this worker was fenced off node {self.node}"
            elif isinstance(outcome, redis.RedisError):
                log.warning("worker: could not start job %s (%s); it was not run", runner.job_id, outcome)
                results[n] = f"skipped: job {runner.job_id}: Redis error at start ({outcome})"
            else:
                results[n] = f"failed: job {runner.job_id}: {outcome}"
        for runner in refused:  # after the accepted ones are on their way: each waits for its shim
            runner.withdraw()
            self._forget(runner)
        if fenced:
            self._on_fenced()

    def _record_end(self, ending: Transition, late_ok: bool) -> None:
        """Every end of an attempt goes through the journal (see worker/journal.py)."""
        self.ends.record(Entry(ending, self.node, late_ok))

    def _record_profile(self, runner: JobRunner, sample: Sample) -> None:
        """A finished attempt's peak into its learned profile. Learning data, not state: if
        Redis cannot take it now, the run is left out of the profile (logged)."""
        memory = self.config.memory
        try:
            self.store.add_profile_sample(
                runner.record.user,
                sample,
                runner.record.profile_key,
                self.fence,
                window=memory.profile_window,
                max_profiles=memory.max_profiles_per_user,
                ttl_s=int(memory.profile_ttl_days * 86400),
            )
        except Fenced:
            log.warning("worker: job %s's run not added to its profile: this worker was fenced", runner.job_id)
        except redis.RedisError as exc:
            log.warning("worker: job %s's run not added to its profile (%s)", runner.job_id, exc)

    def shim_python(self, run_as: RunAs | None) -> str:
        """An interpreter the job's user can run the shim with: this worker's own if it can
        (it may live where only root reads, e.g. under /root), else the system's. Tried once
        per user by running the shim's self-check as that user."""
        if run_as is None:
            return sys.executable
        key = (run_as.uid, run_as.gid)
        if key in self._shim_python:
            return self._shim_python[key]
        tried = []
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
            tried.append(python)
            try:
                with CHILD_STARTS:  # until its pid is where the orphan sweep looks
                    probe = subprocess.Popen(
                        [python, "-I", "-S", SHIM_PATH, "--self-check"],
                        cwd="/",
                        env=SHIM_ENV,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        user=run_as.uid,
                        group=run_as.gid,
                        extra_groups=list(run_as.groups),
                    )
                    with self._lock:
                        self._probes.add(probe.pid)
            except (OSError, subprocess.SubprocessError):
                continue
            try:
                probe.wait(timeout=30)
            except subprocess.TimeoutExpired:
                probe.kill()
                probe.wait()
                continue
            finally:
                with self._lock:
                    self._probes.discard(probe.pid)
            if probe.returncode == 0:
                self._shim_python[key] = python
                return python
        log.error("worker: user %s cannot run the job shim with any of %s", run_as.user, tried)
        return sys.executable  # the launch fails and says so in the job's log

    def _before_finish(self, runner: JobRunner) -> None:
        # Publish the GPUs as they are after the exit before the finish wakes the scheduler,
        # so the next pass sees the memory back instead of a stale snapshot. Whatever of the
        # job this worker adopted (its shim was killed) dies first: the end is recorded only
        # once the whole tree is gone. Its lease is renewed until its end is journaled (then
        # the journal holds it): killing what a shim-killing job left can take longer than the
        # lease under load, and a lapsed lease ended 200 such jobs as lost with their node.
        with self._lock:
            self._ending[runner.job_id] = runner
        self._forget(runner)
        if runner.proc is None or runner.proc.poll() != 0:
            # Only a shim that did not end cleanly can have left its tree to this worker: one
            # that exits 0 has reaped all it had (it is their subreaper). Each look at the
            # worker's children reads the whole process table: once per end made a drain of
            # short jobs quadratic (the monitor still looks every heartbeat).
            self._reap_orphans()
        self._publish_after_now()

    def _publish_after_now(self) -> None:
        """A heartbeat that began after this call did, published. Ends that come together
        share one: when an array drains, one heartbeat covers every job that ended while the
        previous one was being measured (one per end made a drain quadratic in running jobs)."""
        with self._beat_seq_lock:
            wanted = self._beats_begun + 1
        with self._beat_lock:
            if self._beats_done >= wanted:
                return
            self._publish_locked(leases=False)

    def _forget(self, runner: JobRunner) -> None:
        with self._lock:
            self.runners.pop(runner.job_id, None)
        self.logs.finish(runner.job_id, runner.attempt)  # its last output, before its end is recorded

    # ---- monitor -------------------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        interval = self.config.worker.heartbeat_interval_s
        while not self.stopping.wait(interval):
            try:
                self._reap_orphans(wait=False)
                self.publish_heartbeat()
            except redis.RedisError as exc:
                log.warning("worker: heartbeat failed (%s); jobs keep running", exc)
            except Exception:
                log.exception("worker: heartbeat error")
            else:
                self.ends.nudge()  # Redis answers: journaled ends can go in now

    def _reap_orphans(self, *, wait: bool = True) -> None:
        """This worker's only children are its shim fork server and job shims. Any other child
        is a job process whose shim died (a job can kill its own shim) and was adopted by this
        subreaper: it belongs to no live attempt, so it is killed with everything it started.
        Without `wait` (the heartbeat: leases must not wait on a process start), skipped while
        a child is being started."""

        def known() -> set[int]:
            with self._lock:
                shims = {r.proc.pid for r in self.runners.values() if r.proc is not None} | self._probes
            server = self.shim_server.pid
            return shims if server is None else shims | {server}

        sweep_orphans(known, wait=wait)

    def _journal_loop(self) -> None:
        self.ends.run(self.stopping)

    def publish_heartbeat(self) -> None:
        """Renew leases first (they keep jobs alive) and tell each job's shim, then measure
        and publish the GPUs (not while shutting down: the node is offline then)."""
        with self._beat_lock:
            self._publish_locked()

    def _publish_locked(self, leases: bool = True) -> None:
        """One heartbeat. `leases` False (after a job end): a light one (`_light_beat`); the
        leases, the running jobs' observations and enforcement wait for the periodic beat, as
        renewing every lease and reading every job's status after each end made a drain of
        short jobs quadratic in the jobs running."""
        with self._beat_seq_lock:
            self._beats_begun += 1
            seq = self._beats_begun
        ttl_ms = int(self.config.worker.lease_ttl_s * 1000)
        if not leases:
            if not self.draining.is_set():
                self.redis.set(keys.node(self.node), json.dumps(self._light_beat().to_json()), px=ttl_ms)
            self._beats_done = seq
            return
        with self._lock:
            runners = list(self.runners.values())
        running = [r for r in runners if r.pid is not None and not r.done.is_set()]
        # Only started jobs' leases: a job still starting holds its assignment's lease, which
        # its start transition replaces. Renewing that one raced the start: an assignment that
        # timed out while the launch waited (a long queue of launches) came back "lost" just
        # after the start had succeeded, and the freshly started job was stopped as NodeLost.
        # (If the reaper requeues an expired assignment first, the start is refused.)
        started = [r for r in running if r.gate_open]
        if leases and not self._renew_leases(started):
            return
        beat = self._measure(runners)
        pipe = self.redis.pipeline(transaction=False)
        if not self.draining.is_set():
            pipe.set(keys.node(self.node), json.dumps(beat.to_json()), px=ttl_ms)
        pipe.set(keys.node_owner(self.node), self.owner, px=ttl_ms)
        claims_at = len(pipe)
        if self._gpu_uuids:
            claims = [keys.gpu_owner(u) for u in self._gpu_uuids]
            queue_script(pipe, self._renew_gpu_claims, claims, [self.gpu_claim, ttl_ms])
        pipe.sadd(keys.NODES, self.node)
        for runner in running:
            fields: dict[str, object] = {"current_bytes": runner.current, "peak_bytes": runner.peak}
            if runner.mem_warning:
                fields["mem_warning"] = runner.mem_warning
            status = runner.read_status()
            if status is not None:
                fields["status"] = status
            idle_since = runner.idle.flagged_since
            if idle_since != runner.idle_written:
                fields["idle_since"] = "" if idle_since is None else idle_since
                runner.idle_written = idle_since
            self.store.observe(pipe, runner.job_id, runner.attempt, self.fence, fields)
        idle = [r for r in running if r.idle_due]
        for runner in idle:
            self._report_idle(pipe, runner)
        replies = pipe.execute()
        self._beats_done = seq
        if self._gpu_uuids and replies[claims_at]:
            taken = ", ".join(self._gpu_uuids[int(i) - 1] for i in replies[claims_at])
            self._on_fenced(f"GPU {taken} is served by another worker now (this one was frozen or cut off)")
            return
        if self.config.policy.idle_action == "stop":
            for runner in idle:
                runner.stop("idle")

    def _light_beat(self) -> NodeHeartbeat:
        """The heartbeat after a job end: the GPUs as the probe sees them now (the ended job's
        memory back), with the last full beat's job usage, less the jobs that ended since,
        and its outside processes' peaks. No process table read, no enforcement: the
        periodic beat measures and enforces (a job started since the last one shows no usage
        yet: the scheduler counts it at its request)."""
        snapshot = self.probe.snapshot()
        self.gpu_totals.update({d.uuid: d.total_bytes for d in snapshot.devices if d.total_bytes > 0})
        with self._lock:
            live = set(self.runners)
        self._last_usage = tuple(u for u in self._last_usage if u.job_id in live)
        return NodeHeartbeat(self.node, snapshot, self._last_usage, dict(self._last_foreign), False, time.time())

    def _renew_leases(self, started: list[JobRunner]) -> bool:
        """Renew the started jobs' leases and tell their shims; stop the jobs whose lease is
        gone. False when this worker was fenced (it is stopping everything)."""
        # A job whose end is being made or waits in the journal is still this worker's: keep
        # its lease. (A runner is done once its end is journaled, or could not be.)
        with self._lock:
            for job_id in [j for j, r in self._ending.items() if r.done.is_set()]:
                del self._ending[job_id]
            ending = list(self._ending)
        held = [r.job_id for r in started] + ending + self.ends.pending_jobs()
        before = time.monotonic()  # each renewed lease lasts at least until before + ttl
        try:
            lost = self.store.renew_leases(held, self.node, self.config.worker.lease_ttl_s, self.fence)
        except Fenced:
            self._on_fenced()
            return False
        for runner in started:
            if runner.job_id not in lost:
                runner.lease_renewed(before)
        self._stop_lost(lost)
        return True

    def _report_idle(self, pipe: redis.client.Pipeline, runner: JobRunner) -> None:
        """The job's idle spell just reached idle_after_s: an Idle event in its history, and the
        notification hook under idle_action = "notify" (docs in worker/idle.py)."""
        runner.idle_due = False
        policy = self.config.policy
        detail = (
            f"idle: holds GPU memory at <= {policy.idle_max_util_percent:g}% utilisation for "
            f"{duration(policy.idle_after_s)}" + ("; stopping it" if policy.idle_action == "stop" else "")
        )
        log.info("worker: job %s %s", runner.job_id, detail)
        self.store.add_event(pipe, runner.job_id, JobState.RUNNING.value, Reason.IDLE.value, detail)
        if policy.idle_action == "notify":
            emit(pipe, runner.job_id, "idle", detail)

    def _on_fenced(self, why: str = "") -> None:
        """Another worker took this node's name (or its GPUs) while this one was frozen or cut
        off: every job here may already run there. Stop them all (their outcomes are refused:
        the successor and the scheduler decide) and leave."""
        if self.fenced.is_set():
            return
        self.fenced.set()
        why = why or f"node {self.node} was taken over by another worker"
        log.error("worker: %s; stopping every job here and exiting", why)
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
        children = children_by_parent()  # one read of the process table for every job
        for runner in runners:
            if runner.pid is not None:
                pids = tree_pids(runner.pid, children)
                runner.track(pids)
                for pid in pids:
                    owner[pid] = runner
        usage: list[JobGpuUsage] = []
        foreign_now: dict[tuple[str, int], int] = {}
        self.gpu_totals.update({d.uuid: d.total_bytes for d in snapshot.devices if d.total_bytes > 0})
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
        self._enforce(snapshot, runners, foreign_now)
        now = time.time()
        util = {d.uuid: d.utilization_pct if d.healthy else None for d in snapshot.devices}
        for runner in runners:
            if runner.pid is not None and not runner.done.is_set():
                holding = sum(runner.current.values())
                if runner.idle.update(holding, [util.get(u) for u in runner.gpu_uuids], now):
                    runner.idle_due = True
        # Outside processes are held at their peak until they exit (they leave the list).
        self.foreign_peak = {k: max(v, self.foreign_peak.get(k, 0)) for k, v in foreign_now.items()}
        foreign_by_gpu: dict[str, int] = defaultdict(int)
        for (uuid, _pid), peak in self.foreign_peak.items():
            foreign_by_gpu[uuid] += peak
        self._last_usage, self._last_foreign = tuple(usage), dict(foreign_by_gpu)
        return NodeHeartbeat(self.node, snapshot, self._last_usage, dict(foreign_by_gpu), False, time.time())

    def _enforce(self, snapshot: GpuSnapshot, runners: list[JobRunner], outside: dict[tuple[str, int], int]) -> None:
        """Warn, then stop, a job over its request while a co-tenant is at risk (worker/enforcement.py)."""
        live = [r for r in runners if r.pid is not None and not r.done.is_set()]
        gpus = []
        for device in snapshot.devices:
            if not device.healthy:
                continue
            jobs = tuple(
                JobOnGpu(
                    r.job_id,
                    None if r.record.spec.whole_gpu else r.record.spec.mem_bytes,
                    r.current.get(device.uuid, 0),
                )
                for r in live
                if device.uuid in r.gpu_uuids
            )
            outside_used = sum(v for (uuid, _pid), v in outside.items() if uuid == device.uuid)
            gpus.append(GpuState(device.uuid, device.index, device.free_bytes, jobs, outside_used))
        by_id = {r.job_id: r for r in live}
        for decision in self.enforcer.check(gpus, time.monotonic()):
            runner = by_id[decision.job_id]
            log.warning("worker: job %s: %s", runner.job_id, decision.detail)
            if decision.action == "warn":
                runner.memory_warning(decision.detail)
                try:
                    self.store.running_event(
                        runner.job_id, runner.attempt, self.fence, decision.detail, {"mem_warning": decision.detail}
                    )
                except Fenced:
                    self._on_fenced()
                except redis.RedisError as exc:
                    log.warning("worker: could not record job %s's memory warning (%s)", runner.job_id, exc)
            else:
                runner.stop(MEMORY_STOP + decision.detail)

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
            elif len(parts) == 4 and parts[0] == "preempt" and all(p.isdigit() for p in parts[1:]):
                with self._lock:
                    runner = self.runners.get(int(parts[1]))
                if runner is not None and runner.attempt == int(parts[2]):
                    runner.preempted_for = int(parts[3])
                    runner.stop("preempted")


def _dead_local_owner(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))
