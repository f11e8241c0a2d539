"""The Python API: `Client` and `Job`, over the same Unix-socket API as the CLI.

    import gpulab
    job = gpulab.submit(["python", "x.py"], mem="8GiB")
    job.wait()
    print(job.state, job.logs())

It holds no Redis credentials: every call is an HTTP request to the scheduler's socket, whose
identity check (SO_PEERCRED) applies to it exactly as to the CLI.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.client import ApiClient, DaemonUnreachable
from cli.env_capture import captured_env
from gpulab.errors import (
    GpulabError,
    InvalidRequest,
    JobFailed,
    SchedulerUnreachable,
    WaitTimeout,
    from_status,
)
from jobs.api import ApiError
from jobs.config import ConfigError, load_config
from jobs.spec import JobSpec, SpecError, parse_mem, parse_time_limit, validate_spec
from jobs.training_command import factory_stem, resolve_factory, training_argv

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
# Variables that describe the submitting process's own GPU view or job, not the new job's
# (the worker sets them): the same list as `gpulab submit`.
NOT_CAPTURED = frozenset(
    {
        "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPULAB_JOB_ID", "GPULAB_ATTEMPT",
        "GPULAB_ARRAY_JOB_ID", "GPULAB_ARRAY_INDEX", "GPULAB_ARRAY_TASK_COUNT",
    }
)  # fmt: skip
_OPTIONS = frozenset(
    {
        "self", "command", "gpus", "mem", "name", "priority", "time_limit", "hold", "requeue", "cwd", "env",
        "export", "array", "after", "after_any", "exclusive", "node", "gpu_model", "oom_retry", "kind",
    }
)  # fmt: skip
_WAIT_SLICE_S = 60.0  # one long-poll request at most this long (the API caps it at 300 s)
_LOG_WAIT_S = 30.0  # one long-poll for more output at most this long


@dataclass(frozen=True)
class TrainingResult:
    """What the built-in training loop reported last (its status file, as the record holds it)."""

    epoch: int | None
    epochs: int | None
    step: int | None
    loss: float | None
    metrics: dict[str, Any]
    final: bool
    resumed_from_step: int | None
    raw: dict[str, Any]

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> TrainingResult:
        metrics = status.get("metrics")
        return cls(
            epoch=_int_or_none(status.get("epoch")),
            epochs=_int_or_none(status.get("epochs")),
            step=_int_or_none(status.get("step")),
            loss=_float_or_none(status.get("loss")),
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            final=status.get("final") is True,
            resumed_from_step=_int_or_none(status.get("resumed_from_step")),
            raw=dict(status),
        )


class Client:
    """A connection to one gpulab scheduler (its Unix socket). `Client()` finds the socket the
    way the CLI does: $GPULAB_CONFIG / $GPULAB_STATE_DIR, else the defaults."""

    def __init__(self, socket_path: str | Path | None = None, timeout_s: float = 30.0) -> None:
        if socket_path is None:
            try:
                socket_path = load_config().socket_path
            except ConfigError as exc:
                raise InvalidRequest(str(exc)) from None
        self.socket_path = Path(socket_path)
        self._api = ApiClient(self.socket_path, timeout_s)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DaemonUnreachable as exc:
            raise SchedulerUnreachable(str(exc)) from None
        except ApiError as exc:
            raise from_status(exc.status, exc.message) from None

    # ---- submitting ---------------------------------------------------------------------------
    def submit(
        self,
        command: Sequence[str],
        *,
        gpus: int = 1,
        mem: str | int | None = None,
        name: str = "",
        priority: int = 0,
        time_limit: str | float | None = None,
        hold: bool = False,
        requeue: bool = False,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        export: str | None = None,
        array: str = "",
        after: Sequence[int | Job] = (),
        after_any: Sequence[int | Job] = (),
        exclusive: bool = False,
        node: str = "",
        gpu_model: str = "",
        oom_retry: int = 0,
        kind: str = "command",
    ) -> Job:
        """Queue `command` (an argv list, never run through a shell). Options mean what the
        CLI's do; `mem` takes "8GiB" or bytes; `time_limit` "2h" or seconds. `env`: the job's
        whole environment (default: this process's, like `gpulab submit`). With `array`, the
        first task is returned; `Client.submit_array` returns them all."""
        return self._submit(locals())[0]

    def submit_array(self, command: Sequence[str], array: str, **options: Any) -> list[Job]:
        """Queue a job array ("0-31%4": each task gets GPULAB_ARRAY_INDEX); every task's Job."""
        return self._submit({"command": command, "array": array, **options})

    def train(
        self,
        factory: str,
        *factory_args: str,
        epochs: int | None = None,
        seed: int | None = None,
        amp: str | None = None,
        checkpoint_steps: int | None = None,
        requeue: bool = True,
        name: str = "",
        **options: Any,
    ) -> Job:
        """Run the built-in training loop on a factory (file.py, file.py:func or module:func),
        exactly as `gpulab train` does. `job.result` then holds its progress and metrics."""
        loop_args: list[str] = []
        for flag, value in (("--epochs", epochs), ("--seed", seed), ("--amp", amp),
                            ("--checkpoint-every-steps", checkpoint_steps)):  # fmt: skip
            if value is not None:
                loop_args += [flag, str(value)]
        try:
            factory = resolve_factory(factory)
        except FileNotFoundError as exc:
            raise InvalidRequest(f"train: no such file: {exc}") from None
        gpus = int(options.get("gpus", 1))
        command = training_argv(sys.executable, factory, loop_args, factory_args, gpus)
        fields = {"command": command, "name": name or factory_stem(factory), "requeue": requeue, "kind": "training"}
        return self._submit({**options, **fields})[0]

    def _submit(self, options: dict[str, Any]) -> list[Job]:
        spec = self._spec(options)
        answer = self._call(self._api.request, "POST", "/v1/jobs", spec.to_json())
        ids = answer.get("ids") or [answer["id"]]
        return [Job(self, int(i)) for i in ids]

    def _spec(self, o: dict[str, Any]) -> JobSpec:
        unknown = set(o) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown job option: {sorted(unknown)[0]}")
        command = o.get("command")
        if isinstance(command, str) or not command:
            raise InvalidRequest("command: give the program as a non-empty list of strings, e.g. ['python', 'x.py']")
        mem = o.get("mem")
        time_limit = o.get("time_limit")
        env = o.get("env")
        try:
            spec = JobSpec(
                command=tuple(str(a) for a in command),
                cwd=str(Path(o.get("cwd") or os.getcwd()).absolute()),
                gpus=int(o.get("gpus", 1)),
                mem_bytes=parse_mem(mem) if isinstance(mem, str) else mem,
                name=o.get("name") or "",
                env=dict(env) if env is not None else captured_env(os.environ, NOT_CAPTURED, export=o.get("export")),
                time_limit_s=parse_time_limit(time_limit) if isinstance(time_limit, str) else time_limit,
                priority=int(o.get("priority", 0)),
                requeue=bool(o.get("requeue", False)),
                hold=bool(o.get("hold", False)),
                kind=o.get("kind", "command"),
                after_ok=tuple(_job_id(j) for j in o.get("after", ())),
                after_any=tuple(_job_id(j) for j in o.get("after_any", ())),
                array=o.get("array") or "",
                exclusive=bool(o.get("exclusive", False)),
                node=o.get("node") or "",
                gpu_model=o.get("gpu_model") or "",
                oom_retry=int(o.get("oom_retry", 0)),
            )
            validate_spec(spec)
        except SpecError as exc:
            raise InvalidRequest(str(exc)) from None
        return spec

    # ---- reading ------------------------------------------------------------------------------
    def job(self, job_id: int) -> Job:
        """The job with this id (raises JobNotFound)."""
        job = Job(self, job_id)
        job.refresh()
        return job

    def jobs(
        self, *, all_jobs: bool = False, user: str | None = None, me: bool = False, state: str | None = None,
        name: str | None = None,
    ) -> list[Job]:  # fmt: skip
        """Live jobs (with `all_jobs`, finished ones too, every page), filtered by the scheduler
        like `gpulab queue`: `user="a,b"`, `me=True`, `state="PENDING,HELD"`, `name="sweep*"`."""
        query: dict[str, Any] = {"all": "1" if all_jobs else None, "user": user, "me": "1" if me else None,
                                 "state": state, "name": name}  # fmt: skip
        records: list[dict[str, Any]] = []
        while True:
            page = self._call(self._api.jobs_page, query)
            records += page["jobs"]
            if not page.get("next_cursor"):
                return [Job(self, int(r["id"]), r) for r in records]
            query["cursor"] = page["next_cursor"]

    def gpus(self) -> dict[str, Any]:
        """Per node and GPU: total, used, reserved, available (the `gpulab gpus --json` shape)."""
        return dict(self._call(self._api.gpus))


class Job:
    """One gpulab job. Cheap to make; reads the scheduler only when asked (`refresh`, or a
    property of a job that has not ended yet)."""

    def __init__(self, client: Client, job_id: int, record: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = int(job_id)
        self._record = record

    def __repr__(self) -> str:
        state = self._record["state"] if self._record else "?"
        return f"<gpulab.Job {self.id} {state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id and other.client.socket_path == self.client.socket_path

    def __hash__(self) -> int:
        return hash((self.id, str(self.client.socket_path)))

    def refresh(self) -> dict[str, Any]:
        """Read the job's record now; returns it (the `gpulab show --json` shape)."""
        self._record = dict(self.client._call(self.client._api.job, self.id))
        return self._record

    @property
    def record(self) -> dict[str, Any]:
        """The latest record; re-read unless the job has ended (a final record never changes)."""
        if self._record is None or self._record["state"] not in FINAL_STATES:
            return self.refresh()
        return self._record

    @property
    def state(self) -> str:
        """PENDING, HELD, ASSIGNED, RUNNING, COMPLETED, FAILED or CANCELLED."""
        return str(self.record["state"])

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def reason(self) -> str:
        """Why it waits (Resources, Priority, ...) or how it ended (ExitCode, OOM, Cancelled, ...)."""
        return str(self.record.get("reason") or "")

    @property
    def exit_code(self) -> int | None:
        code = self.record.get("exit_code")
        return None if code is None else int(code)

    @property
    def name(self) -> str:
        return str(self.record.get("name", ""))

    @property
    def node(self) -> str:
        return str(self.record.get("node", ""))

    @property
    def gpus(self) -> list[str]:
        """The assigned GPUs' UUIDs (what the job sees in CUDA_VISIBLE_DEVICES)."""
        return [str(g["uuid"]) for g in self.record.get("gpus", [])]

    @property
    def result(self) -> TrainingResult | None:
        """The built-in training loop's last report (epoch, step, loss, metrics); None for a
        plain command or before the loop wrote one."""
        status = self.record.get("status")
        if not isinstance(status, dict) or status.get("kind") != "training":
            return None
        return TrainingResult.from_status(status)

    def wait(self, timeout: float | None = None, *, check: bool = False) -> Job:
        """Block until the job ends; returns the job. Raises WaitTimeout after `timeout`
        seconds, and with `check=True` JobFailed unless it COMPLETED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _WAIT_SLICE_S if deadline is None else max(0.0, min(_WAIT_SLICE_S, deadline - time.monotonic()))
            self._record = dict(self.client._call(self.client._api.wait, self.id, left))
            if self._record["state"] in FINAL_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {self.id} is still {self._record['state']} after {timeout}s")
        if check and self._record["state"] != "COMPLETED":
            raise JobFailed(self.id, self._record["state"], self._record.get("reason") or "", self.exit_code)
        return self

    def logs(self, offset: int = 0) -> str:
        """The job's output (stdout and stderr, as it wrote them) from byte `offset`, so far."""
        return "".join(chunk for chunk, _ in self._log_chunks(offset, follow=False))

    def follow(self) -> Iterator[str]:
        """Yield the job's output as it is written, until the job has ended (like `logs -f`)."""
        for chunk, _ in self._log_chunks(0, follow=True):
            yield chunk

    def _log_chunks(self, offset: int, *, follow: bool) -> Iterator[tuple[str, int]]:
        api = self.client._api
        while True:
            # Following, the scheduler holds each answer until output arrives or the job
            # changes state (a long poll), so this loop does not spin.
            chunk = self.client._call(api.log, self.id, offset, _LOG_WAIT_S if follow else 0.0)
            offset = int(chunk["offset"])
            if chunk["data"]:
                yield str(chunk["data"]), offset
            if chunk["more"]:
                continue
            if not follow or chunk["final"]:
                if chunk["final"] and follow:  # the last lines may have landed after our read
                    tail = self.client._call(api.log, self.id, offset)
                    if tail["data"]:
                        yield str(tail["data"]), int(tail["offset"])
                return

    def _action(self, verb: str) -> Job:
        answer = self.client._call(self.client._api.action, self.id, verb)
        if self._record is not None:
            self._record["state"] = answer.get("state", self._record["state"])
        return self

    def cancel(self) -> Job:
        """Cancel: pending jobs end at once, running ones get SIGTERM (their whole tree)."""
        return self._action("cancel")

    def hold(self) -> Job:
        return self._action("hold")

    def release(self) -> Job:
        return self._action("release")


_default: Client | None = None


def default_client() -> Client:
    """The module-level functions' client, made on first use (the CLI's socket)."""
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit(command: Sequence[str], **options: Any) -> Job:
    """`Client().submit(...)` on the default client."""
    return default_client().submit(command, **options)


def train(factory: str, *factory_args: str, **options: Any) -> Job:
    """`Client().train(...)` on the default client."""
    return default_client().train(factory, *factory_args, **options)


def _job_id(job: int | Job) -> int:
    return job.id if isinstance(job, Job) else int(job)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


__all__ = ["Client", "GpulabError", "Job", "TrainingResult", "default_client", "submit", "train"]
