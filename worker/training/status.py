"""The status file the worker reads, and the exit codes it maps to reasons.

The job process holds no Redis credentials, so progress reaches the scheduler through a
small JSON file (``GPULAB_STATUS_FILE``) that the worker polls and copies into the job
record. The file is replaced atomically (temp file in the same directory + ``os.replace``),
so a reader never sees half a document. Writes are throttled to one per second: the worker
polls far less often than that, and a fast loop must not spend its time on JSON.

This module imports neither torch nor anything from ``jobs/`` or ``scheduler/``: the
worker may import the constants below without pulling torch into its own process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

OOM_EXIT_CODE = 75
"""Exit code after ``torch.cuda.OutOfMemoryError`` (EX_TEMPFAIL); the worker maps it to reason OOM."""

SIGTERM_EXIT_CODE = 143
"""Exit code after a graceful stop on SIGTERM (128 + 15, what a shell reports for a TERM kill)."""

SIGINT_EXIT_CODE = 130
"""Exit code after a graceful stop on SIGINT (Ctrl-C when run by hand)."""

USAGE_EXIT_CODE = 2
"""Bad command line or factory (same convention as the gpulab CLI)."""

STATUS_MIN_INTERVAL_S = 1.0
"""At most one status write per this many seconds, plus the final one (the contract)."""


def notice(message: str, err: bool = True) -> None:
    """One ``gpulab training:`` line; notices go to stderr so stdout stays progress lines."""
    print(f"gpulab training: {message}", file=sys.stderr if err else sys.stdout, flush=True)


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/Infinity: a diverged loss is reported as null, not as invalid JSON."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _sanitize(value: Any) -> Any:
    """Replace non-finite floats anywhere in ``value`` by None, so the document is valid JSON."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def write_json_atomic(path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` so that readers see either the old or the new file, whole.

    No fsync: the status file is a live view, not a record; after a power cut the worker
    re-reads nothing from it. Atomicity against concurrent readers is what matters.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".status-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, allow_nan=False, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Progress:
    """Everything the status file reports; the loop mutates it, the writer serialises it."""

    epochs: int
    steps_total: int | None
    epoch: int = 1
    step: int = 0
    loss: float | None = None
    samples_per_s: float = 0.0
    eta_s: float | None = None
    final: bool = False
    metrics: dict[str, Any] | None = None
    oom: bool = False
    peak_bytes: int | None = None
    resumed_from_step: int | None = None
    state: str = "running"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The contract's keys exactly, plus ``state`` and anything in ``extra``."""
        doc: dict[str, Any] = {
            "kind": "training",
            "epoch": int(self.epoch),
            "epochs": int(self.epochs),
            "step": int(self.step),
            "steps_total": self.steps_total,
            "loss": _finite_or_none(self.loss),
            "samples_per_s": _finite_or_none(self.samples_per_s) or 0.0,
            "eta_s": _finite_or_none(self.eta_s),
            "updated_at": time.time(),
            "final": bool(self.final),
            "metrics": _sanitize(self.metrics),
            "oom": bool(self.oom),
            "peak_bytes": self.peak_bytes,
            "resumed_from_step": self.resumed_from_step,
            "state": self.state,
        }
        doc.update(_sanitize(self.extra))
        return doc


class StatusWriter:
    """Throttled, atomic writer of the status file; a no-op when no path is configured.

    The loop asks ``due()`` after every optimizer step and writes at most once per
    ``STATUS_MIN_INTERVAL_S``; ``write`` always writes (start, stop, end).
    """

    def __init__(self, path: str | None, min_interval_s: float = STATUS_MIN_INTERVAL_S) -> None:
        self.path = path or None
        self.min_interval_s = min_interval_s
        self._last_write = -math.inf

    def write(self, progress: Progress) -> None:
        """Write now, whatever the throttle says."""
        self._last_write = time.monotonic()
        if self.path is None:
            return
        write_json_atomic(self.path, progress.to_json())

    def due(self) -> bool:
        """Whether a throttled write would happen now (lets callers skip building the document)."""
        return time.monotonic() - self._last_write >= self.min_interval_s


def format_progress(progress: Progress) -> str:
    """One human-readable line for the job log (stdout)."""
    total = f"/{progress.steps_total}" if progress.steps_total is not None else ""
    loss = "-" if progress.loss is None else f"{progress.loss:.4f}"
    eta = "?" if progress.eta_s is None else _fmt_duration(progress.eta_s)
    return (
        f"epoch {progress.epoch}/{progress.epochs} step {progress.step}{total} "
        f"loss {loss} {progress.samples_per_s:.1f} samples/s eta {eta}"
    )


def _fmt_duration(seconds: float) -> str:
    """Compact h/m/s, e.g. ``1h02m``, ``3m05s``, ``12s``."""
    s = round(max(0.0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
