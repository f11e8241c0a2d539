"""Prometheus metrics, computed from Redis on each scrape (a custom Collector).

Gauges are read from Redis on each scrape. The job counters and the wait histogram are real
counters kept in Redis (scheduler/counters.py: folded from the transition stream), so they
never decrease - not across scheduler restarts either - and cover all time, not a window.
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
from scheduler.counters import WAIT_BUCKETS, MetricCounters
from scheduler.service import Caller, SchedulerService

READER = Caller(uid=-2, user="metrics", pid=0)
GPU_LABELS = ["node", "gpu", "uuid", "model"]


def wait_histogram(counts: dict[str, float]) -> HistogramMetricFamily:
    """Queue wait (submit -> first start) of every job counted since the counters began."""
    buckets = [(repr(b), counts.get(f"wait_le:{b!r}", 0.0)) for b in WAIT_BUCKETS]
    buckets.append(("+Inf", counts.get("wait_count", 0.0)))
    family = HistogramMetricFamily("gpulab_job_wait_seconds", "Queue wait (first start - submit) of started jobs")
    family.add_metric([], buckets, sum_value=counts.get("wait_sum", 0.0))
    return family


class GpulabCollector(Collector):
    def __init__(self, service: SchedulerService) -> None:
        self.service = service
        self.counters = MetricCounters(service.redis)

    def collect(self) -> Iterator[Metric]:
        svc, now = self.service, time.time()
        live = svc.store.waiting() + svc.store.active()
        self.counters.fold()  # current to this scrape
        counts = self.counters.read()
        yield from self._jobs(live)
        yield from self._outcomes(counts)
        yield wait_histogram(counts)
        yield from self._gpus()
        yield from self._scheduler(now)

    def _jobs(self, live: list[JobRecord]) -> Iterator[Metric]:
        family = GaugeMetricFamily("gpulab_jobs", "Live jobs by state and user", labels=["state", "user"])
        for (state, user), n in sorted(Counter((r.state.value, r.user) for r in live).items()):
            family.add_metric([state, safe(user)], n)
        yield family

    def _outcomes(self, counts: dict[str, float]) -> Iterator[Metric]:
        """Counters from Redis (scheduler/counters.py): they never go down, restarts included."""
        ended = CounterMetricFamily(
            "gpulab_jobs_finished", "Finished jobs by state and reason", labels=["state", "reason"]
        )
        failed = oom = 0.0
        for field, n in sorted(counts.items()):
            if field.startswith("finished:"):
                _, state, reason = field.split(":", 2)
                ended.add_metric([state, safe(reason)], n)
                failed += n if state == "FAILED" else 0.0
                oom += n if reason == "OOM" else 0.0
        yield ended
        yield CounterMetricFamily("gpulab_jobs_started", "Job starts (every attempt)", value=counts.get("started", 0.0))
        yield CounterMetricFamily("gpulab_jobs_failed", "Jobs that ended FAILED", value=failed)
        yield CounterMetricFamily("gpulab_jobs_oom", "Jobs that ended with a CUDA out-of-memory error", value=oom)
        requeued = counts.get("requeued", 0.0)
        yield CounterMetricFamily(
            "gpulab_jobs_requeued", "Jobs sent back to wait from a node (lost, preempted)", value=requeued
        )

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
