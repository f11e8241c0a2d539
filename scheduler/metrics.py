"""Prometheus metrics, computed from Redis on each scrape (a custom Collector).

Nothing on the scheduling hot path counts anything: the job counters are derived from the
most recent `FINISHED_WINDOW` finished records (their states, reasons and attempts) plus the
live ones, so they are exact until the history outgrows the window, and bounded in cost.
Label values that come from outside the scheduler (users, reasons, node and GPU names) go
through jobs.text.safe: one printable line of bounded length (the exposition format escapes
quotes and newlines itself, but not other control characters, and no label should be huge).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from jobs import keys
from jobs.record import JobRecord
from jobs.text import safe
from scheduler.service import Caller, SchedulerService

FINISHED_WINDOW = 5000
WAIT_WINDOW_S = 3600.0
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
READER = Caller(uid=-2, user="metrics", pid=0)
GPU_LABELS = ["node", "gpu", "uuid", "model"]


def wait_histogram(records: list[JobRecord], now: float) -> HistogramMetricFamily:
    """started_at - submitted_at of the jobs that started in the last hour on their first attempt."""
    waits = [
        r.started_at - r.submitted_at
        for r in records
        if r.started_at and r.started_at >= now - WAIT_WINDOW_S and r.attempt <= 1
    ]
    buckets = [(repr(b), sum(1 for w in waits if w <= b)) for b in WAIT_BUCKETS] + [("+Inf", len(waits))]
    family = HistogramMetricFamily(
        "gpulab_job_wait_seconds", "Queue wait (start - submit) of jobs started in the last hour"
    )
    family.add_metric([], buckets, sum_value=sum(waits))
    return family


class GpulabCollector(Collector):
    def __init__(self, service: SchedulerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc, now = self.service, time.time()
        live = svc.store.waiting() + svc.store.active()
        finished = svc.store.finished(limit=FINISHED_WINDOW)
        yield from self._jobs(live)
        yield from self._outcomes(live, finished)
        yield wait_histogram(live + finished, now)
        yield from self._gpus()
        yield from self._scheduler(now)

    def _jobs(self, live: list[JobRecord]) -> Iterator[Metric]:
        family = GaugeMetricFamily("gpulab_jobs", "Live jobs by state and user", labels=["state", "user"])
        for (state, user), n in sorted(Counter((r.state.value, r.user) for r in live).items()):
            family.add_metric([state, safe(user)], n)
        yield family

    def _outcomes(self, live: list[JobRecord], finished: list[JobRecord]) -> Iterator[Metric]:
        ended = CounterMetricFamily(
            "gpulab_jobs_finished", "Finished jobs by state and reason (recent window)", labels=["state", "reason"]
        )
        for (state, reason), n in sorted(Counter((r.state.value, r.reason) for r in finished).items()):
            ended.add_metric([state, safe(reason)], n)
        yield ended
        started = sum(1 for r in live + finished if r.started_at)
        yield CounterMetricFamily("gpulab_jobs_started", "Jobs that started at least once", value=started)
        failed = sum(1 for r in finished if r.state.value == "FAILED")
        yield CounterMetricFamily("gpulab_jobs_failed", "Jobs that ended FAILED", value=failed)
        oom = sum(1 for r in finished if r.reason == "OOM")
        yield CounterMetricFamily("gpulab_jobs_oom", "Jobs that ended with a CUDA out-of-memory error", value=oom)
        requeues = sum(max(0, r.attempt - 1) for r in live + finished)  # dispatch counts attempts from 1
        yield CounterMetricFamily("gpulab_jobs_requeued", "Requeues (node lost, preempted)", value=requeues)

    def _gpus(self) -> Iterator[Metric]:
        fields = {
            "total": ("total_bytes", "GPU memory in all"),
            "used": ("used_bytes", "GPU memory in use (NVML)"),
            "gpulab_reserved": ("gpulab_reserved_bytes", "GPU memory reserved by gpulab jobs"),
            "gpulab_used": ("gpulab_used_bytes", "GPU memory held by gpulab jobs now"),
            "others_used": ("others_used_bytes", "GPU memory used by processes outside gpulab"),
            "available": ("available_bytes", "GPU memory the scheduler may still promise"),
        }
        families = {
            k: GaugeMetricFamily(f"gpulab_gpu_{k}_bytes", text, labels=GPU_LABELS) for k, (_, text) in fields.items()
        }
        jobs = GaugeMetricFamily("gpulab_gpu_jobs", "gpulab jobs on the GPU", labels=GPU_LABELS)
        healthy = GaugeMetricFamily("gpulab_gpu_healthy", "1 if NVML reads the GPU", labels=GPU_LABELS)
        up = GaugeMetricFamily("gpulab_node_up", "1 while the node heartbeats", labels=["node"])
        draining = GaugeMetricFamily("gpulab_node_draining", "1 while the node is drained", labels=["node"])
        for node in self.service.gpus(READER)["nodes"]:
            name = safe(node["name"])
            up.add_metric([name], 1 if node["online"] else 0)
            draining.add_metric([name], 1 if node["draining"] else 0)
            for gpu in node["gpus"]:
                labels = [name, str(gpu["index"]), safe(gpu["uuid"]), safe(gpu["name"])]
                for key, (field, _) in fields.items():
                    families[key].add_metric(labels, gpu[field])
                jobs.add_metric(labels, gpu["jobs"])
                healthy.add_metric(labels, 1 if gpu["healthy"] else 0)
        yield from (*families.values(), jobs, healthy, up, draining)

    def _scheduler(self, now: float) -> Iterator[Metric]:
        raw = {k.decode(): v.decode() for k, v in self.service.redis.hgetall(keys.SCHEDULER_STATUS).items()}
        if "last_pass_ms" in raw:
            yield GaugeMetricFamily(
                "gpulab_scheduler_pass_seconds",
                "Duration of the last scheduling pass",
                value=float(raw["last_pass_ms"]) / 1000,
            )
        if "last_pass_at" in raw:
            yield GaugeMetricFamily(
                "gpulab_scheduler_last_pass_age_seconds", "Seconds since the last scheduling pass",
                value=max(0.0, now - float(raw["last_pass_at"])),
            )  # fmt: skip


def make_registry(service: SchedulerService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpulabCollector(service))
    return registry
