"""Learned memory profiles: what "the same job" is, and what it should ask for next time.

Pure (no Redis, no clock): the scheduler computes a job's profile key at submit (never the
client: a key sent by a client could write into another user's profile), the worker
records each finished attempt's measured peak under it (`JobStore.add_profile_sample`), and
`learn` turns the recent runs into a request: a high quantile of the peaks plus a margin.
See docs/ARCHITECTURE.md, "Memory profiles".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from jobs.sizes import MiB, format_size
from jobs.spec import JobSpec

MAX_LABEL = 200
MAX_BYTES = 2**50  # what jobs.spec.validate_spec accepts for --mem
TRAINING_MODULE = "worker.training"
# Options of the built-in loop that change what one step holds on the GPU; the others
# (epochs, seed, checkpointing, resume) change how long it runs, not how much it holds.
_LOOP_MEMORY_OPTIONS = ("--amp", "--device")


@dataclass(frozen=True)
class ProfileKey:
    digest: str  # sha256 over (user, identity): never shared between users
    label: str  # what the user recognises: "train digits.py --batch-size 64"


@dataclass(frozen=True)
class Sample:
    """One finished attempt of a profile. `peak` is the worker's own measurement (NVML per
    process tree, the most on any one GPU); `allocator_peak` and `estimate` are the job's
    and the pre-run estimate's figures, kept for comparison only."""

    job_id: int
    attempt: int
    peak: int
    at: float
    request: int | None = None
    oom: bool = False  # ended out of memory or stopped over its request: the peak is a lower bound
    allocator_peak: int | None = None
    estimate: int | None = None
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Sample | None:
        """A stored sample, or None when it does not parse (never raises)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                job_id=int(data["job_id"]),
                attempt=int(data["attempt"]),
                peak=_bounded(data["peak"]) or 0,
                at=float(data["at"]),
                request=_bounded(data.get("request")),
                oom=data.get("oom") is True,
                allocator_peak=_bounded(data.get("allocator_peak")),
                estimate=_bounded(data.get("estimate")),
                label=str(data.get("label", ""))[:MAX_LABEL],
            )
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def need(self) -> int:
        """What this run needed at least: its peak, or, when it ran out, more than it had."""
        return max(self.peak, self.request or 0) if self.oom else self.peak


def _bounded(value: Any) -> int | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_BYTES:
        return None
    return int(value)


@dataclass(frozen=True)
class LearnPolicy:
    quantile: float = 0.95
    margin: float = 0.05
    min_runs: int = 3
    outlier_factor: float = 4.0  # a peak over this x the median of the others is left out; 0 = never
    min_request: int = 256 * MiB


@dataclass(frozen=True)
class Learned:
    request: int
    runs: int
    outliers: int
    origin: str  # "11.2 GiB from 6 runs, p95 + 10%"


def quantile(values: Sequence[int], q: float) -> int:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def learn(samples: Iterable[Sample], policy: LearnPolicy) -> Learned | None:
    """The request the recent runs call for; None below `min_runs` runs.

    A run that ran out of memory counts at least at what it had. One huge outlier (a peak
    over `outlier_factor` x the median of the other runs, which are at least `min_runs`)
    is left out and said so: it ages out of the window anyway, and until then it would
    double every request. Runs that ran out of memory are never left out."""
    runs = list(samples)
    if len(runs) < max(1, policy.min_runs):
        return None
    needs = [s.need for s in runs]
    kept = list(needs)
    outliers = 0
    if policy.outlier_factor > 0:
        kept = []
        for i, run in enumerate(runs):
            others = needs[:i] + needs[i + 1 :]
            median = sorted(others)[len(others) // 2] if others else 0
            if (
                not run.oom
                and len(others) >= policy.min_runs
                and median > 0
                and run.need > policy.outlier_factor * median
            ):
                outliers += 1
            else:
                kept.append(run.need)
        if not kept:  # every run an "outlier" of the others: there is no typical run, keep all
            kept, outliers = list(needs), 0
    base = quantile(kept, policy.quantile)
    wanted = max(policy.min_request, math.ceil(base * (1 + policy.margin)))
    request = min(MAX_BYTES, -(-wanted // MiB) * MiB)  # whole MiB, up
    how = f"p{policy.quantile * 100:g} + {policy.margin * 100:g}%"
    if base * (1 + policy.margin) < policy.min_request:
        how += f", at least {format_size(policy.min_request)}"
    origin = f"{format_size(request)} from {len(runs)} runs, {how}"
    if outliers:
        origin += f" ({outliers} outlier{'s' if outliers > 1 else ''} left out)"
    return Learned(request, len(runs), outliers, origin)


def profile_key(spec: JobSpec, user: str, ignore_args: Sequence[str] = ()) -> ProfileKey:
    """The profile a job belongs to: its user, its kind, its program and script (as absolute
    paths: `train.py` in two projects are two programs) and the arguments that matter (all of
    them but `ignore_args`, so a changed batch size is a new profile), and its GPU count."""
    if spec.kind == "training":
        identity, label = _training_identity(spec, ignore_args)
    else:
        identity, label = _command_identity(spec, ignore_args)
    canonical = json.dumps([user, spec.kind, spec.gpus, identity], separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    if spec.gpus > 1:
        label += f" [{spec.gpus} GPUs]"
    return ProfileKey(digest, label[:MAX_LABEL])


def _training_identity(spec: JobSpec, ignore_args: Sequence[str]) -> tuple[list[str], str]:
    argv = list(spec.command)
    try:
        start = argv.index(TRAINING_MODULE) + 1
    except ValueError:
        return _command_identity(spec, ignore_args)
    rest = argv[start:]
    cut = rest.index("--") if "--" in rest else len(rest)
    own, factory_args = rest[:cut], rest[cut + 1 :]
    factory = _absolute(own[0], spec.cwd) if own else ""
    loop = _kept_options(own[1:], _LOOP_MEMORY_OPTIONS)
    args = _without(factory_args, ignore_args)
    name = os.path.basename(factory.split(":")[0]) or "?"
    return ["train", factory, *loop, "--", *args], " ".join(["train", name, *loop, *args])


def _command_identity(spec: JobSpec, ignore_args: Sequence[str]) -> tuple[list[str], str]:
    argv = list(spec.command)
    program = os.path.basename(argv[0]) if argv else ""
    rest = argv[1:]
    script: list[str] = []
    if program.startswith("python") and rest:
        if rest[0] == "-m" and len(rest) > 1:
            script, rest = ["-m", rest[1]], rest[2:]
        elif not rest[0].startswith("-"):
            script, rest = [_absolute(rest[0], spec.cwd)], rest[1:]
    elif argv and "/" in argv[0]:
        program = _absolute(argv[0], spec.cwd)
    args = _without(rest, ignore_args)
    shown = [os.path.basename(program), *(os.path.basename(s) if s != "-m" else s for s in script), *args]
    return [program, *script, *args], " ".join(shown)


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, path)) if path and not path.startswith("/") else path


def _without(args: Sequence[str], ignore: Sequence[str]) -> list[str]:
    """`args` without the ignored options and their values (`--seed 3`, `--seed=3`)."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            if not arg.startswith("-"):
                continue
        name = arg.split("=", 1)[0]
        if name in ignore:
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return kept


def _kept_options(args: Sequence[str], wanted: Sequence[str]) -> list[str]:
    kept: list[str] = []
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name in wanted:
            kept.append(arg)
            if "=" not in arg and i + 1 < len(args):
                kept.append(args[i + 1])
    return kept


def from_estimate(estimate: int, policy: LearnPolicy) -> tuple[int, str]:
    """A first request from a pre-run estimate (no profile yet): plus the same margin as a
    learned one, whole MiB, at least the floor."""
    wanted = max(policy.min_request, math.ceil(estimate * (1 + policy.margin)))
    request = min(MAX_BYTES, -(-wanted // MiB) * MiB)
    how = f"the pre-run estimate {format_size(estimate)} + {policy.margin * 100:g}%"
    return request, f"{format_size(request)} from {how} (no runs yet)"
