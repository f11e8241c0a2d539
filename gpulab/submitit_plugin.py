"""A submitit executor for gpulab: code written for `submitit.AutoExecutor(folder)` on Slurm runs
on gpulab with `AutoExecutor(folder, cluster="gpulab")`.

submitit finds it through the `submitit` entry-point group (pyproject.toml). Like submitit's
Slurm executor, the caller pickles the function and its arguments into the folder, the job
(`python -m gpulab.submitit_job FOLDER`, run as the user under gpulab's shim like any job)
unpickles and runs it, and pickles the outcome back. No daemon ever reads a pickle: gpulab's
records stay JSON.

Pickles are code: `pickle.load` runs whatever the file says. So both ends load only a regular
file (never through a symlink) that belongs to the loading user and that nobody else may write,
and the executor makes the folder 0700 when it creates it. A result planted in a shared
folder by another user is refused (`UnsafePickle`), never loaded.

Parameters (AutoExecutor's generic ones, and `gpulab_*` ones):
- `gpus_per_node` -> `--gpus` (0 or unset: 1 GPU; gpulab only runs GPU jobs)
- `gpulab_mem_per_gpu` -> `--mem` ("8GiB", or a number of GiB); unset: a whole idle GPU.
  `mem_gb` is host memory on Slurm; gpulab does not schedule host memory and ignores it.
- `timeout_min` -> `--time`; `name` -> `--name`
- `slurm_array_parallelism`'s twin `gpulab_array_parallelism` -> `--array 0-N%P`
- `gpulab_priority`, `gpulab_requeue`, `gpulab_exclusive`, `gpulab_node`, `gpulab_gpu_model`
- `nodes` > 1 and `tasks_per_node` > 1 are refused (one process per job, on one node).
"""

from __future__ import annotations

import os
import pickle
import stat
import sys
import time
import typing as tp
import uuid
import warnings
from pathlib import Path

from submitit.core import core, job_environment, utils

from gpulab.client import NOT_CAPTURED, Client, Job
from gpulab.errors import GpulabError
from jobs.sizes import GiB

R = tp.TypeVar("R", covariant=True)

JOB_MODULE = "gpulab.submitit_job"
_PICKLE_WAIT_S = 60.0  # as submitit's own runner: the caller moves the pickle in after submit


class UnsafePickle(GpulabError):
    """A pickle that another user could have written: not a regular file, not ours, or
    writable by group or others. It is never loaded."""


def load_owned_pickle(path: Path) -> tp.Any:
    """Unpickle `path` only if it is a regular file (not a link, FIFO or device) owned by this
    user and writable by nobody else. Checked on the open descriptor, so it cannot be swapped
    between the check and the load. FileNotFoundError when it is not there (yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnsafePickle(f"{path}: refusing to load ({exc.strerror}; a symlink?)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePickle(f"{path}: refusing to load: not a regular file")
        if st.st_uid != os.getuid():
            raise UnsafePickle(f"{path}: refusing to load: owned by uid {st.st_uid}, not by you ({os.getuid()})")
        if st.st_mode & 0o022:
            raise UnsafePickle(f"{path}: refusing to load: writable by group or others (mode {st.st_mode & 0o777:o})")
        return pickle.load(f)


def make_private_folder(folder: Path) -> None:
    """Create the folder (and missing parents) 0700; an existing folder is left as it is (the
    per-file checks protect it), but one that others may write triggers a warning."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        warnings.warn(
            f"{folder} is writable by everyone: others can delete your jobs' pickles "
            "(gpulab refuses to load any they plant); use a private folder",
            stacklevel=3,
        )


class GpulabJobEnvironment(job_environment.JobEnvironment):
    """`submitit.JobEnvironment()` inside a gpulab job (one task per job)."""

    _env: tp.ClassVar[dict[str, str]] = {
        "job_id": "GPULAB_JOB_ID",
        "num_tasks": "SUBMITIT_GPULAB_NTASKS",
        "num_nodes": "SUBMITIT_GPULAB_NNODES",
        "node": "SUBMITIT_GPULAB_NODEID",
        "global_rank": "SUBMITIT_GPULAB_GLOBALID",
        "local_rank": "SUBMITIT_GPULAB_LOCALID",
    }

    def activated(self) -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "gpulab" and "GPULAB_JOB_ID" in os.environ

    def _handle_signals(self, paths: utils.JobPaths, submission: utils.DelayedSubmission) -> None:
        """gpulab stops a job with SIGTERM (cancel, --time): let it end the job, unlike
        submitit's Slurm handler that ignores SIGTERM and waits for a pre-timeout signal."""

    def _requeue(self, countdown: int) -> None:
        """gpulab requeues `gpulab_requeue=True` jobs itself after a node loss."""


class GpulabJob(core.Job[R]):
    """A submitit Job backed by a gpulab job (its id is the gpulab job id)."""

    _results_timeout_s = 5  # an ended job's result should be there at once (same host or NFS lag)

    def __init__(self, folder: Path | str, job_id: str, tasks: tp.Sequence[int] = (0,)) -> None:
        super().__init__(folder, job_id, tasks)
        self._socket_path: str | None = None

    def _register_in_watcher(self) -> None:
        """No sacct-style watcher: each call asks the scheduler (one request)."""

    def _gpulab(self) -> Job:
        return Job(Client(self._socket_path), int(self.job_id))

    @property
    def state(self) -> str:
        """gpulab's state: PENDING, HELD, ASSIGNED, RUNNING, COMPLETED, FAILED, CANCELLED."""
        try:
            return self._gpulab().state
        except GpulabError:
            return "UNKNOWN"

    def get_info(self, mode: str = "force") -> dict[str, str]:
        record = self._gpulab().refresh()
        return {"JobID": self.job_id, "State": str(record["state"]), "Reason": str(record.get("reason") or ""),
                "ExitCode": str(record.get("exit_code"))}  # fmt: skip

    def done(self, force_check: bool = False) -> bool:
        if self.paths.result_pickle.exists():
            return True
        return self._gpulab().done

    def wait(self) -> None:
        """Block until the gpulab job ended (a long poll, not submitit's 1 s loop)."""
        self._gpulab().wait()

    def cancel(self, check: bool = True) -> None:
        try:
            self._gpulab().cancel()
        except GpulabError:
            if check:
                raise

    def _get_logs_string(self, name: str) -> str | None:
        """stdout() and stderr(): gpulab keeps one log per job, both streams in order."""
        try:
            return self._gpulab().logs()
        except GpulabError:
            return None

    def _get_outcome_and_result(self) -> tuple[str, tp.Any]:
        deadline = time.monotonic() + self._results_timeout_s
        while True:
            try:
                outcome = load_owned_pickle(self.paths.result_pickle)
            except FileNotFoundError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise utils.UncompletedJobError(self._no_result_message()) from None
            if not (isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] in ("success", "error")):
                raise UnsafePickle(f"{self.paths.result_pickle}: not a submitit result")
            return outcome

    def _no_result_message(self) -> str:
        try:
            job = self._gpulab()
            record = job.refresh()
            ending = f"{record['state']} {record.get('reason') or ''} exit {record.get('exit_code')}"
            log = job.logs()[-4000:]
        except GpulabError as exc:
            ending, log = f"unknown ({exc})", ""
        return (
            f"gpulab job {self.job_id} (task {self.task_id}) produced no result at {self.paths.result_pickle}: "
            f"it ended {ending}\n" + (f"Its log ends with:\n{log}" if log else "It wrote no log.")
        )


class GpulabExecutor(core.PicklingExecutor):
    """submitit executor that submits to gpulab. `AutoExecutor(folder, cluster="gpulab")`, or
    directly `GpulabExecutor(folder, socket_path=...)`."""

    job_class = GpulabJob

    def __init__(
        self,
        folder: str | Path,
        max_num_timeout: int = 3,
        max_pickle_size_gb: float = 1.0,
        python: str | None = None,
        socket_path: str | Path | None = None,
    ) -> None:
        super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb)
        self.python = python or sys.executable
        self.socket_path = None if socket_path is None else str(socket_path)
        make_private_folder(utils.JobPaths.get_first_id_independent_folder(self.folder))

    @classmethod
    def affinity(cls) -> int:
        return -1  # chosen by name only (cluster="gpulab"), never by AutoExecutor's auto-detection

    @classmethod
    def _equivalence_dict(cls) -> core.EquivalenceDict:
        return {"name": "name", "timeout_min": "timeout_min", "mem_gb": "mem_gb", "nodes": "nodes",
                "cpus_per_task": "cpus_per_task", "gpus_per_node": "gpus_per_node",
                "tasks_per_node": "tasks_per_node"}  # fmt: skip

    @classmethod
    def _valid_parameters(cls) -> set[str]:
        return {
            "name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
            "stderr_to_stdout", "mem_per_gpu", "array_parallelism", "priority", "requeue", "exclusive",
            "node", "gpu_model",
        }  # fmt: skip

    def _internal_update_parameters(self, **kwargs: tp.Any) -> None:
        unknown = sorted(set(kwargs) - self._valid_parameters())
        if unknown:
            valid = ", ".join(sorted(self._valid_parameters()))
            raise ValueError(f"gpulab executor: unknown parameter(s) {unknown}; valid: {valid}")
        if int(kwargs.get("nodes") or 1) > 1:
            raise ValueError("gpulab executor: nodes must be 1 (a gpulab job runs on one node)")
        if int(kwargs.get("tasks_per_node") or 1) > 1:
            raise ValueError("gpulab executor: tasks_per_node must be 1 (use gpus_per_node and torchrun inside)")
        super()._internal_update_parameters(**kwargs)

    def _client(self) -> Client:
        return Client(self.socket_path)

    def _options(self) -> dict[str, tp.Any]:
        """gpulab submit options from the executor's parameters."""
        p = self.parameters
        mem = p.get("mem_per_gpu")
        options: dict[str, tp.Any] = {
            "gpus": max(1, int(p.get("gpus_per_node") or 1)),
            "mem": int(mem * GiB) if isinstance(mem, int | float) else mem,
            "name": p.get("name") or "submitit",
            "priority": int(p.get("priority") or 0),
            "requeue": bool(p.get("requeue", False)),
            "exclusive": bool(p.get("exclusive", False)),
            "node": p.get("node") or "",
            "gpu_model": p.get("gpu_model") or "",
        }
        if p.get("timeout_min"):
            options["time_limit"] = float(p["timeout_min"]) * 60
        return options

    def _job_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in NOT_CAPTURED}
        env["SUBMITIT_EXECUTOR"] = "gpulab"
        return env

    def _internal_process_submissions(
        self, delayed_submissions: list[utils.DelayedSubmission]
    ) -> list[core.Job[tp.Any]]:
        """Pickle each call (0600), submit one gpulab job per call (an array for several),
        then move each pickle to `<job id>_submitted.pkl`, where that job looks for it."""
        if not delayed_submissions:
            return []
        timeout_min = self.parameters.get("timeout_min") or 5
        indep = utils.JobPaths.get_first_id_independent_folder(self.folder)
        pickles: list[Path] = []
        try:
            for delayed in delayed_submissions:
                path = indep / f"{uuid.uuid4().hex}.pkl"
                delayed.set_timeout(timeout_min, self.max_num_timeout)
                delayed.dump(path)
                path.chmod(0o600)
                pickles.append(path)
            size_gb = sum(p.stat().st_size for p in pickles) / 1024**3
            if size_gb > self.max_pickle_size_gb:
                raise RuntimeError(
                    f"submitting {size_gb:.2f} GB of pickled functions and arguments, over "
                    f"max_pickle_size_gb={self.max_pickle_size_gb}; raise it if this is intended"
                )
            jobs = self._submit_jobs(len(pickles))
            for job, path in zip(jobs, pickles, strict=True):
                job.paths.move_temporary_file(path, "submitted_pickle")
        finally:
            for path in pickles:
                path.unlink(missing_ok=True)
        return list(jobs)

    def _submit_jobs(self, count: int) -> list[GpulabJob[tp.Any]]:
        client, options = self._client(), self._options()
        command = [self.python, "-m", JOB_MODULE, str(self.folder)]
        if count == 1:
            submitted = [client.submit(command, env=self._job_env(), **options)]
        else:
            parallel = self.parameters.get("array_parallelism")
            array = f"0-{count - 1}" + (f"%{int(parallel)}" if parallel else "")
            submitted = client.submit_array(command, array, env=self._job_env(), **options)
        jobs = []
        for gjob in submitted:
            job: GpulabJob[tp.Any] = GpulabJob(folder=self.folder, job_id=str(gjob.id))
            job._socket_path = self.socket_path
            jobs.append(job)
        return jobs

    # The pickling executor's single-command path is not used: submissions go through the API.
    def _num_tasks(self) -> int:
        return 1

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return ""

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return []

    @staticmethod
    def _get_job_id_from_submission_command(string: bytes | str) -> str:
        return "0"
