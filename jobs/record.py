"""A job as stored: the spec plus everything gpulab learned about it, built from its Redis hash."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jobs.spec import JobSpec
from jobs.states import FINAL_STATES, JobState


class InvalidRecord(ValueError):
    """A stored record that does not parse or validate (written by an older version, or by a
    path that missed validation). Daemons quarantine it; they never die of it."""


@dataclass(frozen=True)
class GpuAssignment:
    index: int
    uuid: str


@dataclass(frozen=True)
class JobRecord:
    id: int
    spec: JobSpec
    state: JobState
    user: str
    uid: int
    reason: str = ""
    detail: str = ""
    submitted_at: float = 0.0
    assigned_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    node: str = ""
    gpus: tuple[GpuAssignment, ...] = ()
    attempt: int = 0
    oom_retries: int = 0
    exit_code: int | None = None
    pid: int | None = None
    peak_bytes: dict[str, int] = field(default_factory=dict)
    current_bytes: dict[str, int] = field(default_factory=dict)
    mem_warning: str = ""
    status: dict[str, Any] | None = None
    log_path: str = ""
    array_id: int | None = None  # task of this array (the array's id = its first task's id)
    array_index: int | None = None
    est_start_at: float | None = None  # while PENDING with a reservation: expected start

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def peak_total(self) -> int:
        return sum(self.peak_bytes.values())

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes] | dict[str, str]) -> JobRecord:
        """Parse a stored hash; raise InvalidRecord (one line: why) if it does not validate."""
        try:
            return cls._from_hash(raw)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise InvalidRecord(f"invalid job record: {type(exc).__name__}: {str(exc)[:200]}") from None

    @classmethod
    def _from_hash(cls, raw: dict[bytes, bytes] | dict[str, str]) -> JobRecord:
        h = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        gpus = tuple(GpuAssignment(int(g["index"]), str(g["uuid"])) for g in json.loads(h.get("gpus") or "[]"))
        return cls(
            id=int(h["id"]),
            spec=JobSpec.from_json(json.loads(h["spec"])),
            state=JobState(h["state"]),
            user=h.get("user", ""),
            uid=int(h.get("uid", "-1")),
            reason=h.get("reason", ""),
            detail=h.get("detail", ""),
            submitted_at=float(h.get("submitted_at", "0")),
            assigned_at=_float(h.get("assigned_at")),
            started_at=_float(h.get("started_at")),
            ended_at=_float(h.get("ended_at")),
            node=h.get("node", ""),
            gpus=gpus,
            attempt=int(h.get("attempt", "0")),
            oom_retries=int(h.get("oom_retries", "0")),
            exit_code=_int(h.get("exit_code")),
            pid=_int(h.get("pid")),
            peak_bytes={k: int(v) for k, v in json.loads(h.get("peak_bytes") or "{}").items()},
            current_bytes={k: int(v) for k, v in json.loads(h.get("current_bytes") or "{}").items()},
            mem_warning=h.get("mem_warning", ""),
            status=_status(h.get("status")),
            log_path=h.get("log_path", ""),
            array_id=_int(h.get("array_id")),
            array_index=_int(h.get("array_index")),
            est_start_at=_float(h.get("est_start_at")),
        )

    def to_json(self, *, private: bool = True) -> dict[str, Any]:
        """The record as the API and `--json` show it. `private=False` hides command and environment."""
        spec = self.spec.to_json()
        # Environment values may hold tokens: only variable names ever leave the daemons.
        spec["env"] = sorted(self.spec.env) if private else []
        if not private:
            spec["command"] = ["(hidden)"]
        return {
            "id": self.id,
            "name": self.spec.display_name,
            "state": self.state.value,
            "reason": self.reason,
            "detail": self.detail,
            "user": self.user,
            "uid": self.uid,
            "spec": spec,
            "submitted_at": self.submitted_at,
            "assigned_at": self.assigned_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "node": self.node,
            "gpus": [{"index": g.index, "uuid": g.uuid} for g in self.gpus],
            "attempt": self.attempt,
            "oom_retries": self.oom_retries,
            "exit_code": self.exit_code,
            "pid": self.pid,
            "peak_bytes": self.peak_bytes,
            "current_bytes": self.current_bytes,
            "mem_warning": self.mem_warning,
            "status": self.status,
            "log_path": self.log_path,
            "array_id": self.array_id,
            "array_index": self.array_index,
            "est_start_at": self.est_start_at if self.state == JobState.PENDING else None,
        }


def _status(value: str | None) -> dict[str, Any] | None:
    """The job's own status (job-written, stored as checked by the worker): a dict or nothing."""
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None
