"""A job as stored: the spec plus everything gpulab learned about it, built from its Redis hash."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from jobs.spec import JobSpec
from jobs.states import FINAL_STATES, JobState, Reason
from jobs.text import public_status

# The job's own status file is written by the job: what is stored of it is bounded, so one
# job cannot put megabytes into Redis and into everyone's queue listing.
MAX_STATUS_BYTES = 64 * 1024
MAX_STATUS_DEPTH = 16
HIDDEN = "(hidden)"
# Details that quote the job's own spec (its program, its directory): its owner's business.
_PRIVATE_DETAIL = frozenset({Reason.LAUNCH_FAILED.value, Reason.INVALID.value})


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
    est_start_at: float | None = None  # while PENDING: expected start (reservation or forecast)
    idle_since: float | None = None  # while RUNNING: idle (GPU memory held, ~0% utilisation) since
    profile_key: str = ""  # the learned memory profile its runs go to (set by the scheduler at submit)
    profile_label: str = ""
    mem_origin: str = ""  # where --mem came from: "11.2 GiB from 6 runs, p95 + 10%"

    def updated(self, **changes: Any) -> JobRecord:
        """A copy with `changes`, as `dataclasses.replace` makes it without its cost: a frozen
        dataclass sets every field through object.__setattr__ (7 us a copy here, against 1 us),
        and the scheduler's readers copy a record for every job that moved in a pass."""
        unknown = changes.keys() - self.__dataclass_fields__.keys()
        if unknown:
            raise TypeError(f"JobRecord has no field {sorted(unknown)[0]!r}")
        twin = object.__new__(JobRecord)
        twin.__dict__.update(self.__dict__)
        twin.__dict__.update(changes)
        return twin

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
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
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
            spec=_spec(h["spec"]),
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
            profile_key=h.get("profile_key", ""),
            profile_label=h.get("profile_label", ""),
            mem_origin=h.get("mem_origin", ""),
            idle_since=_float(h.get("idle_since")),
        )

    def to_json(self, *, private: bool = True) -> dict[str, Any]:
        """The record as the API and `--json` show it. Environment values never leave the
        daemons (they may hold tokens): only variable names, and only to the owner.

        `private=False` is what other users see: no command, directory, environment, log
        path or status beyond numeric progress, and no detail that quotes the spec."""
        spec = self.spec.to_json()
        spec["env"] = sorted(self.spec.env) if private else []
        if not private:
            spec["command"] = [HIDDEN]
            spec["cwd"] = HIDDEN
            # A webhook URL is often a credential (Slack, Mattermost) and an address is personal.
            spec["notify_url"] = HIDDEN if self.spec.notify_url else ""
            spec["mail"] = HIDDEN if self.spec.mail else ""
        return {
            "id": self.id,
            "name": self.spec.display_name,
            "state": self.state.value,
            "reason": self.reason,
            "detail": self.detail if private else public_detail(self.reason, self.detail),
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
            "status": self.status if private else public_status(self.status),
            "log_path": self.log_path if private else "",
            "array_id": self.array_id,
            "array_index": self.array_index,
            "est_start_at": self.est_start_at if self.state == JobState.PENDING else None,
            "profile_key": self.profile_key if private else "",
            "profile_label": self.profile_label if private else "",
            "mem_origin": self.mem_origin,
            "idle_since": self.idle_since if self.state == JobState.RUNNING else None,
        }


def public_detail(reason: str, detail: str) -> str:
    """A reason's detail as another user may see it."""
    return HIDDEN if detail and reason in _PRIVATE_DETAIL else detail


def public_event(event: dict[str, str]) -> dict[str, str]:
    """A history event as another user may see it."""
    return {**event, "detail": public_detail(event.get("reason", ""), event.get("detail", ""))}


def checked_status(value: Any) -> dict[str, Any] | None:
    """A job-written status as it may be stored and shown: a JSON object of at most
    MAX_STATUS_BYTES, nested at most MAX_STATUS_DEPTH, NaN and infinities as null (a diverged
    loss is still worth showing). Anything else becomes a one-line note for its owner."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return _status_note("the status file must hold a JSON object")
    try:
        clean = _finite(value, 0)
    except ValueError as exc:
        return _status_note(str(exc))
    if len(json.dumps(clean).encode()) > MAX_STATUS_BYTES:
        return _status_note(f"the status file is over {MAX_STATUS_BYTES} bytes")
    return clean  # type: ignore[no-any-return]


def _status_note(why: str) -> dict[str, Any]:
    return {"kind": "invalid", "error": f"{why}; not stored"}


def _finite(value: Any, depth: int) -> Any:
    if depth > MAX_STATUS_DEPTH:
        raise ValueError(f"the status is nested deeper than {MAX_STATUS_DEPTH} levels")
    if isinstance(value, dict):
        return {str(k): _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float):
        return value
    raise ValueError(f"the status holds a {type(value).__name__}, not JSON")


def _status(value: str | None) -> dict[str, Any] | None:
    """The job's own status, as stored (checked again: older versions stored it whole)."""
    if not value:
        return None
    if len(value) > MAX_STATUS_BYTES:
        return _status_note(f"the status file is over {MAX_STATUS_BYTES} bytes")
    try:
        data = json.loads(value, parse_constant=lambda _name: None)
    except (ValueError, RecursionError):
        return None
    return checked_status(data) if isinstance(data, dict) else None


_SPECS: dict[str, JobSpec] = {}  # spec JSON -> its parse; an array's tasks share one
SPEC_CACHE_SIZE = 4096


def _spec(text: str) -> JobSpec:
    """The stored spec, parsed and validated once per distinct JSON text (JobSpec is frozen
    and nothing changes its env): a drain of a 1,000-task array parsed the same spec 1,000
    times, at ~20 us each."""
    spec = _SPECS.get(text)
    if spec is None:
        spec = JobSpec.from_json(json.loads(text))
        if len(_SPECS) >= SPEC_CACHE_SIZE:
            _SPECS.clear()  # bounded; refilled by the specs still in use
        _SPECS[text] = spec
    return spec


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None
