"""Where a job's `--mem` comes from when the user did not give one: its learned profile, or
the pre-run estimate of a training step, or a whole GPU (docs/ARCHITECTURE.md, "Memory
profiles"). Also the API's views of profiles (`gpulab profile`).

The profile key is computed here from the validated spec and the caller's identity, never
taken from the client: a key the client chose could feed or read another user's profile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from jobs.api import ApiError
from jobs.config import Config
from jobs.profiles import LearnPolicy, ProfileKey, Sample, from_estimate, learn, profile_key
from jobs.spec import JobSpec, SpecError
from jobs.store import JobStore


def learn_policy(config: Config) -> LearnPolicy:
    m = config.memory
    return LearnPolicy(
        quantile=m.auto_quantile,
        margin=m.auto_margin,
        min_runs=m.auto_min_runs,
        outlier_factor=m.outlier_factor,
        min_request=m.auto_min_request_bytes,
    )


@dataclass(frozen=True)
class Resolution:
    spec: JobSpec
    key: ProfileKey
    runs: int
    origin: str  # "" when the user's own --mem (or the whole-GPU default) stands

    def fields(self) -> dict[str, str]:
        """What the job's record keeps of it (JobStore.submit's `extra`)."""
        return {"profile_key": self.key.digest, "profile_label": self.key.label, "mem_origin": self.origin}


class MemoryResolver:
    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.policy = learn_policy(config)

    def key(self, spec: JobSpec, user: str) -> ProfileKey:
        return profile_key(spec, user, self.config.memory.profile_ignore_args)

    def resolve(self, spec: JobSpec, user: str) -> Resolution:
        """The spec with its request filled in where the user left it to gpulab:
        `--mem auto`, or no `--mem` at all once the profile has `auto_min_runs` runs.
        `--mem SIZE` and `--exclusive` always stand as given."""
        key = self.key(spec, user)
        if spec.mem_bytes is not None or spec.exclusive:
            return Resolution(spec, key, 0, "")
        samples = self.store.profile_samples(key.digest)
        learned = learn(samples, self.policy)
        if learned is not None:
            return Resolution(replace(spec, mem_bytes=learned.request), key, learned.runs, learned.origin)
        if spec.mem_estimate is not None and spec.kind == "training" and (spec.mem_auto or not samples):
            request, origin = from_estimate(spec.mem_estimate, self.policy)
            return Resolution(replace(spec, mem_bytes=request), key, len(samples), origin)
        if spec.mem_auto:
            need = self.policy.min_runs
            origin = f"a whole GPU: {len(samples)} of the {need} runs --mem auto needs, and no estimate"
            return Resolution(spec, key, len(samples), origin)
        return Resolution(spec, key, len(samples), "")

    def whole_gpu_instead(self, resolution: Resolution, why: str) -> Resolution:
        """A learned or estimated request no GPU can offer: the job gets a whole GPU."""
        spec = replace(resolution.spec, mem_bytes=None)
        return replace(resolution, spec=spec, origin=f"a whole GPU: {resolution.origin} is {why}")

    def preview(self, body: Any, user: str) -> dict[str, Any]:
        """`POST /v1/profiles/resolve`: what a submit of this spec would ask for (the CLI
        asks before it spends time on an estimate). Stores nothing."""
        try:
            spec = JobSpec.from_json(body)
        except SpecError as exc:
            raise ApiError(400, str(exc)) from None
        resolution = self.resolve(replace(spec, mem_estimate=None), user)
        learned = resolution.spec.mem_bytes if resolution.spec.mem_bytes != spec.mem_bytes else None
        return {
            "profile_key": resolution.key.digest,
            "label": resolution.key.label,
            "runs": resolution.runs,
            "mem_bytes": learned,
            "origin": resolution.origin if learned is not None else "",
        }

    def list_profiles(self, user: str) -> list[dict[str, Any]]:
        """`GET /v1/profiles`: the user's profiles, most recently run first."""
        views = []
        for digest, samples in self.store.user_profiles(user).items():
            learned = learn(samples, self.policy)
            request, origin = (learned.request, learned.origin) if learned else (None, "")
            views.append(profile_view(digest, samples, request, origin))
        return views


def profile_view(digest: str, samples: list[Sample], request: int | None, origin: str) -> dict[str, Any]:
    newest = samples[0]
    estimates = [(s.estimate, s.peak) for s in samples if s.estimate and s.peak]
    return {
        "profile_key": digest,
        "label": newest.label,
        "runs": len(samples),
        "last_run_at": newest.at,
        "last_job": newest.job_id,
        "peaks": [s.peak for s in samples],
        "ooms": sum(1 for s in samples if s.oom),
        "max_peak_bytes": max(s.peak for s in samples),
        "request_bytes": request,
        "origin": origin or f"not used yet: {len(samples)} run(s)",
        "estimate_error": [round((e - p) / p, 4) for e, p in estimates],
        "samples": [s.to_json() for s in samples],
    }
