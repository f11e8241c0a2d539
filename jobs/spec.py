"""What a user asks for: the job spec, its JSON form, and its validation.

The same `validate_spec` runs in the CLI (fast, clear errors) and in the scheduler's API
(the authority: the CLI is not trusted), so a bad spec is refused before anything is stored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from jobs.arrays import parse_array
from jobs.notify import DEFAULT_EVENTS, NotifyError, NotifySettings
from jobs.sizes import parse_size

MAX_GPUS_PER_JOB = 16
MAX_ARGV_BYTES = 128 * 1024
MAX_ENV_BYTES = 256 * 1024
MAX_NAME = 128
MAX_PRIORITY = 10_000
MAX_TIME_LIMIT_S = 365 * 86400
MAX_OOM_RETRY = 10
MAX_DEPENDENCIES = 100
MAX_JOB_ID = 2**53
# What execve and chdir take (Linux): one argv/env string "K=V" at most MAX_ARG_STRLEN bytes
# with its NUL, a path under PATH_MAX, each of its names at most NAME_MAX. A spec past them
# could pass every other check and fail only at launch, on every attempt.
MAX_ARG_STRLEN = 32 * 4096
PATH_MAX = 4096
NAME_MAX = 255
MAX_ARRAY_TEXT = 4096  # the --array text itself (it is parsed, and cached, by the scheduler)
KINDS = ("command", "training")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@=-]*$")
_TIME_UNIT_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|min|h|d)$")


class SpecError(ValueError):
    """One mistake in a submission. `str()` is the one line the user sees."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class JobSpec:
    command: tuple[str, ...]
    cwd: str
    gpus: int = 1
    mem_bytes: int | None = None  # per GPU; None = a whole idle GPU
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    time_limit_s: float | None = None
    priority: int = 0
    requeue: bool = False
    hold: bool = False
    kind: str = "command"
    after_ok: tuple[int, ...] = ()  # --after: start once these COMPLETED
    after_any: tuple[int, ...] = ()  # --after-any: start once these ended, however
    array: str = ""  # --array 0-31%4
    exclusive: bool = False  # whole GPUs, whatever --mem says
    node: str = ""  # --node: only this node
    gpu_model: str = ""  # --gpu-model: GPU name contains this (case-insensitive)
    oom_retry: int = 0  # --oom-retry N: after a CUDA OOM, run again with more memory, N times
    mem_auto: bool = False  # --mem auto: the scheduler sets mem_bytes from the job's profile
    mem_estimate: int | None = None  # the pre-run estimate of one step's peak (bytes, `gpulab train`)
    notify_url: str = ""  # --notify-url: a webhook (JSON POST, signed) for notify_on events
    mail: str = ""  # --mail: an address for notify_on events
    notify_on: tuple[str, ...] = ()  # --notify-on end,fail,held,started-late,idle
    # --preemptible / --no-preemptible: may be stopped (SIGTERM) and requeued for a job with a
    # higher claim. None = the default: built-in-loop jobs yes (they checkpoint), others no.
    preemptible: bool | None = None

    @property
    def notify(self) -> NotifySettings:
        return NotifySettings(self.notify_url, self.mail, self.notify_on)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["command"] = list(self.command)
        data["after_ok"] = list(self.after_ok)
        data["after_any"] = list(self.after_any)
        data["notify_on"] = list(self.notify_on)
        return data

    @property
    def whole_gpu(self) -> bool:
        """Takes whole GPUs: no --mem given, or --exclusive."""
        return self.mem_bytes is None or self.exclusive

    @classmethod
    def from_json(cls, data: Any) -> JobSpec:
        """Build and validate a spec from untrusted JSON (the API's request body)."""
        if not isinstance(data, dict):
            raise SpecError("spec", "must be a JSON object")
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise SpecError(sorted(unknown)[0], "unknown field")
        if "command" not in data or "cwd" not in data:
            raise SpecError("command" if "command" not in data else "cwd", "is required")
        command = data["command"]
        if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise SpecError("command", "must be a list of strings (argv)")
        env = data.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise SpecError("env", "must be an object of string to string")
        spec = cls(
            command=tuple(command),
            cwd=_typed(data, "cwd", str, ""),
            gpus=_typed(data, "gpus", int, 1),
            mem_bytes=_typed(data, "mem_bytes", int, None),
            name=_typed(data, "name", str, ""),
            env=dict(env),
            time_limit_s=_number_or_none(data, "time_limit_s"),
            priority=_typed(data, "priority", int, 0),
            requeue=_typed(data, "requeue", bool, False),
            hold=_typed(data, "hold", bool, False),
            kind=_typed(data, "kind", str, "command"),
            after_ok=_id_list(data, "after_ok"),
            after_any=_id_list(data, "after_any"),
            array=_typed(data, "array", str, ""),
            exclusive=_typed(data, "exclusive", bool, False),
            node=_typed(data, "node", str, ""),
            gpu_model=_typed(data, "gpu_model", str, ""),
            oom_retry=_typed(data, "oom_retry", int, 0),
            notify_url=_typed(data, "notify_url", str, ""),
            mail=_typed(data, "mail", str, ""),
            notify_on=_events(data),
            mem_auto=_typed(data, "mem_auto", bool, False),
            mem_estimate=_typed(data, "mem_estimate", int, None),
            preemptible=_typed(data, "preemptible", bool, None),
        )
        validate_spec(spec)
        return spec

    @property
    def may_be_preempted(self) -> bool:
        """Opted in (`--preemptible`), or a built-in-loop job that did not opt out."""
        return self.preemptible if self.preemptible is not None else self.kind == "training"

    @property
    def display_name(self) -> str:
        return self.name or (self.command[0].rsplit("/", 1)[-1] if self.command else "job")


def _typed(data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = data.get(key, default)
    if value is None and default is None:
        return None
    # bool is an int in Python; refuse it where a number is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(key, f"must be of type {kind.__name__}")
    return value


def _id_list(data: dict[str, Any], key: str) -> tuple[int, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SpecError(key, "must be a list of job ids")
    return tuple(value)


def _events(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("notify_on", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError("--notify-on", "must be a list of event names")
    return tuple(value)


def _number_or_none(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(key, "must be a number of seconds")
    return float(value)


def validate_spec(spec: JobSpec) -> None:
    """Raise SpecError for the first mistake; return None when the spec is acceptable."""
    if not 0 <= spec.oom_retry <= MAX_OOM_RETRY:
        raise SpecError("--oom-retry", f"must be between 0 and {MAX_OOM_RETRY}")
    for what, text in _strings(spec):
        if not _encodable(text):
            raise SpecError(what, "contains characters that cannot be passed to a program (lone surrogates)")
    if not spec.command or not spec.command[0]:
        raise SpecError("command", "is empty; give the program after '--', e.g. gpulab submit -- python train.py")
    if sum(len(_os_bytes(a)) + 1 for a in spec.command) > MAX_ARGV_BYTES:
        raise SpecError("command", f"is longer than {MAX_ARGV_BYTES} bytes")
    if any("\x00" in a for a in spec.command):
        raise SpecError("command", "contains a NUL byte")
    if not spec.cwd.startswith("/") or "\x00" in spec.cwd:
        raise SpecError("cwd", "must be an absolute path")
    if len(_os_bytes(spec.cwd)) >= PATH_MAX or any(len(_os_bytes(p)) > NAME_MAX for p in spec.cwd.split("/")):
        raise SpecError("cwd", f"is longer than the system allows (PATH_MAX {PATH_MAX}, NAME_MAX {NAME_MAX} bytes)")
    if not 1 <= spec.gpus <= MAX_GPUS_PER_JOB:
        raise SpecError("--gpus", f"must be between 1 and {MAX_GPUS_PER_JOB}, got {spec.gpus}")
    if spec.mem_bytes is not None and not 2**20 <= spec.mem_bytes <= 2**50:
        raise SpecError("--mem", "must be between 1MiB and 1PiB per GPU")
    if spec.mem_estimate is not None and not 0 <= spec.mem_estimate <= 2**50:
        raise SpecError("mem_estimate", "must be between 0 and 1PiB")
    if spec.name and (len(spec.name) > MAX_NAME or not _NAME_RE.match(spec.name)):
        raise SpecError("--name", f"use up to {MAX_NAME} letters, digits and ._:+@=- (starting with a letter or digit)")
    if any("\x00" in k or "=" in k or not k or "\x00" in v for k, v in spec.env.items()):
        raise SpecError("env", "variable names must be non-empty without '=' or NUL")
    # Bytes as exec() gets them ("K=V\0"), not characters: a non-ASCII value is longer.
    env_sizes = {k: len(_os_bytes(k)) + len(_os_bytes(v)) + 2 for k, v in spec.env.items()}
    if sum(env_sizes.values()) > MAX_ENV_BYTES:
        raise SpecError("env", f"captured environment is larger than {MAX_ENV_BYTES} bytes")
    too_long = sorted(k for k, n in env_sizes.items() if n > MAX_ARG_STRLEN)
    if too_long:  # the name only: values may be secrets
        raise SpecError("env", f"variable {too_long[0][:64]!r} is over {MAX_ARG_STRLEN} bytes, more than exec() takes")
    if spec.time_limit_s is not None and not 0 < spec.time_limit_s <= MAX_TIME_LIMIT_S:
        raise SpecError("--time", "must be more than 0 and at most 365 days")
    if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
        raise SpecError("--priority", f"must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
    if spec.kind not in KINDS:
        raise SpecError("kind", f"must be one of {', '.join(KINDS)}")
    _validate_policy_fields(spec)
    _validate_notify(spec)


def _validate_notify(spec: JobSpec) -> None:
    try:
        spec.notify.checked()
    except NotifyError as exc:
        flag, _, message = str(exc).partition(": ")
        raise SpecError(flag, message) from None


def with_notify_defaults(spec: JobSpec) -> JobSpec:
    """A spec that names a destination but no events gets the default ones (end,fail,held)."""
    if (spec.notify_url or spec.mail) and not spec.notify_on:
        return replace(spec, notify_on=DEFAULT_EVENTS)
    return spec


def _strings(spec: JobSpec) -> list[tuple[str, str]]:
    return [
        *(("command", a) for a in spec.command),
        ("cwd", spec.cwd),
        ("--name", spec.name),
        *(("env", s) for kv in spec.env.items() for s in kv),
    ]


def _os_bytes(text: str) -> bytes:
    """`text` as the OS gets it (what os.fsencode does on Linux)."""
    return text.encode("utf-8", "surrogateescape")


def _encodable(text: str) -> bool:
    """Strings reach exec() as bytes: what Python cannot encode would fail only at launch."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _validate_policy_fields(spec: JobSpec) -> None:
    for flag, ids in (("--after", spec.after_ok), ("--after-any", spec.after_any)):
        if len(ids) > MAX_DEPENDENCIES:
            raise SpecError(flag, f"at most {MAX_DEPENDENCIES} jobs")
        if any(not 1 <= i <= MAX_JOB_ID for i in ids):
            raise SpecError(flag, "job ids are whole numbers, 1 or more")
    if len(spec.array) > MAX_ARRAY_TEXT:
        raise SpecError("--array", f"is longer than {MAX_ARRAY_TEXT} characters")
    if spec.array:
        try:
            parse_array(spec.array)
        except ValueError as exc:
            raise SpecError("--array", str(exc)) from None
    if spec.node and (len(spec.node) > MAX_NAME or not _NAME_RE.match(spec.node)):
        raise SpecError("--node", "must be a node name (letters, digits and ._:+@=-)")
    if len(spec.gpu_model) > MAX_NAME or not all(c.isprintable() for c in spec.gpu_model):
        raise SpecError("--gpu-model", f"use up to {MAX_NAME} printable characters, e.g. A100 or 'RTX 4090'")


def parse_mem(text: str) -> int:
    """`--mem` as bytes per GPU, with the error message naming the option."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise SpecError("--mem", str(exc)) from None


def parse_time_limit(text: str) -> float:
    """Slurm's forms (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) or `90s`, `30m`, `2h`, `1.5d`."""
    text = text.strip()
    unit_match = _TIME_UNIT_RE.match(text)
    if unit_match:
        scale = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[unit_match["unit"]]
        seconds = float(unit_match["n"]) * scale
    else:
        seconds = _slurm_time(text)
    if not 0 < seconds <= MAX_TIME_LIMIT_S:
        raise SpecError("--time", f"'{text}' must be more than 0 and at most 365 days")
    return seconds


def _slurm_time(text: str) -> float:
    parts = text.split("-", 1)
    days = 0
    rest = text
    if len(parts) == 2:
        if not parts[0].isdigit():
            raise SpecError("--time", f"'{text}' is not a time; use e.g. 30m, 2h, 1-12:00:00 or 90:00")
        days, rest = int(parts[0]), parts[1]
    fields_ = rest.split(":")
    if not 1 <= len(fields_) <= 3 or not all(f.isdigit() for f in fields_):
        raise SpecError("--time", f"'{text}' is not a time; use e.g. 30m, 2h, 1-12:00:00 or 90:00")
    numbers = [int(f) for f in fields_]
    if len(parts) == 2:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, s = ([*numbers, 0, 0])[:3]
    elif len(numbers) == 1:  # MM
        h, m, s = 0, numbers[0], 0
    elif len(numbers) == 2:  # MM:SS
        h, m, s = 0, numbers[0], numbers[1]
    else:
        h, m, s = numbers
    return float(days * 86400 + h * 3600 + m * 60 + s)
