"""A job's files on its node, handled by a worker that may be root.

The log, run and checkpoint directories live under gpulab's own state directory. Root creates
them with *at() calls relative to an already-open, already-checked parent and O_NOFOLLOW, so
no symlink or other substitution by a job (which owns its run and checkpoint directories and
may fill them with anything between attempts) makes root write, chown or read elsewhere.

Whatever a job writes is the job's *data*: its status file is opened without following
symlinks and without blocking (a FIFO must never hang the heartbeat), only as a regular file
its owner owns, at most `MAX_STATUS_FILE_BYTES`, and what is kept of it is a small dict of
typed, capped fields (`clean_status`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_STATUS_FILE_BYTES = 64 * 1024
MAX_STATUS_KEYS = 30
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 200
MAX_STATUS_JSON = 16 * 1024  # what is stored in the record, serialised
MAX_INT = 2**63 - 1


class UnsafePath(OSError):
    """A directory on gpulab's own path is not what gpulab made (wrong type or owner)."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _open_own_dir(parent_fd: int | None, path: str, mode: int) -> int:
    """Open (creating it if missing) a directory that belongs to this worker's user."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode, dir_fd=parent_fd)
    fd = os.open(path, _DIR_FLAGS, dir_fd=parent_fd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafePath(errno.EPERM, f"{path} is owned by uid {st.st_uid}, not by gpulab's user")
    return fd


def open_state_subdir(state_dir: Path, name: str) -> int:
    """An fd of `state_dir/name` (created 0755, must be ours). The state dir itself is
    configuration (trusted); `name` is one of gpulab's own folders (logs, run, checkpoints)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with _opened(os.open(state_dir, _DIR_FLAGS)) as base:
        return _open_own_dir(base, name, 0o755)


def job_dir(state_dir: Path, folder: str, name: str, uid: int | None, gid: int | None) -> None:
    """Make `state_dir/folder/name` a 0700 directory owned by the job's user (uid None: this
    worker's own). An existing one owned by somebody else (a job id reused after Redis was
    reset) is moved aside, never handed over with its contents."""
    with _opened(open_state_subdir(state_dir, folder)) as parent:
        fd = _open_job_dir(parent, name, uid)
        with _opened(fd):
            if uid is not None and gid is not None:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o700)


def _open_job_dir(parent: int, name: str, uid: int | None) -> int:
    owner = os.geteuid() if uid is None else uid
    for _ in range(3):
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            fd = -1  # a file or symlink where the directory should be (the parent is ours: set aside)
        if fd >= 0:
            st = os.fstat(fd)
            if st.st_uid in (owner, os.geteuid()):
                return fd
            os.close(fd)
        os.rename(name, f".stale-{name}-{time.time_ns()}", src_dir_fd=parent, dst_dir_fd=parent)
    raise UnsafePath(errno.EAGAIN, f"cannot make a private directory {name}")


def remove_in_job_dir(state_dir: Path, folder: str, name: str, entry: str) -> None:
    """Remove one entry (never following it) from a job's directory, if it is there."""
    with _opened(open_state_subdir(state_dir, folder)) as parent:
        directory = os.open(name, _DIR_FLAGS, dir_fd=parent)
    with _opened(directory), contextlib.suppress(FileNotFoundError, IsADirectoryError):
        os.unlink(entry, dir_fd=directory)


def open_log(state_dir: Path, name: str, uid: int | None, gid: int | None) -> int:
    """An fd (append) of the job's log `state_dir/logs/name`, a regular file owned by the
    job's user, 0600. One owned by anyone else (job id reuse) is replaced."""
    owner = os.geteuid() if uid is None else uid
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with _opened(open_state_subdir(state_dir, "logs")) as logs:
        for _ in range(3):
            try:
                fd = os.open(name, flags, 0o600, dir_fd=logs)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise
                fd = -1
            if fd >= 0:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_uid in (owner, os.geteuid()):
                    os.set_blocking(fd, True)
                    if uid is not None and gid is not None:
                        os.fchown(fd, uid, gid)
                    os.fchmod(fd, 0o600)
                    return fd
                os.close(fd)
            os.rename(name, f".stale-{name}-{time.time_ns()}", src_dir_fd=logs, dst_dir_fd=logs)
    raise UnsafePath(errno.EAGAIN, f"cannot open the log {name}")


# ---- the job's status file: data, never trusted ---------------------------------------------------
def read_status_file(path: Path, uid: int, last_mtime_ns: int = 0) -> tuple[int, dict[str, Any] | None] | None:
    """The job's status, cleaned, and the file's mtime; None when unchanged since
    `last_mtime_ns`, missing, not a regular file of `uid`, too big or not JSON."""
    read = _read_regular(path, MAX_STATUS_FILE_BYTES, uid=uid, unless_mtime_ns=last_mtime_ns)
    if read is None:
        return None
    mtime_ns, data = read
    return mtime_ns, parse_status(data)


def read_small_file(path: Path | str, max_bytes: int) -> bytes | None:
    """A regular file's bytes if it has at most `max_bytes`; None otherwise (missing, a
    symlink, a FIFO or device, too big). Never blocks: for files others may write."""
    read = _read_regular(path, max_bytes)
    return None if read is None else read[1]


def _read_regular(
    path: Path | str, max_bytes: int, *, uid: int | None = None, unless_mtime_ns: int = 0
) -> tuple[int, bytes] | None:
    """(mtime ns, bytes) of a regular file of at most `max_bytes` (owned by `uid` if given,
    changed since `unless_mtime_ns` if given). Opens with O_NOFOLLOW | O_NONBLOCK: a
    symlink is refused and a FIFO does not block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes or (uid is not None and st.st_uid != uid):
            return None
        if unless_mtime_ns and st.st_mtime_ns == unless_mtime_ns:
            return None
        data = os.read(fd, max_bytes + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return (st.st_mtime_ns, data) if len(data) <= max_bytes else None


def _no_number(_name: str) -> None:
    """NaN and Infinity (Python's JSON extensions, e.g. a diverged loss) read as null: the
    record must stay strict JSON for every reader."""
    return None


def parse_status(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_number)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return clean_status(value)


def clean_status(value: Any) -> dict[str, Any] | None:
    """What is kept of a job-written status: a dict of at most MAX_STATUS_KEYS string keys
    whose values are None, booleans, finite numbers (a non-finite one is None), strings of
    at most MAX_TEXT_CHARS, or one level of such a dict (training metrics). Everything else
    (lists, deeper dicts, huge integers, odd keys) is dropped."""
    if not isinstance(value, dict):
        return None
    cleaned = _clean_mapping(value, nested=True)
    while len(json.dumps(cleaned)) > MAX_STATUS_JSON and cleaned:
        cleaned.popitem()  # the last keys go first; the training contract's come first
    return cleaned


def _clean_mapping(value: dict[Any, Any], *, nested: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if len(out) >= MAX_STATUS_KEYS:
            break
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            continue
        if isinstance(item, dict):
            if nested:
                out[key] = _clean_mapping(item, nested=False)
            continue
        scalar = _clean_scalar(item)
        if scalar is not _DROP:
            out[key] = scalar
    return out


_DROP = object()


def _clean_scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -MAX_INT <= value <= MAX_INT else _DROP
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # 1e999 parses as inf: no number
    if isinstance(value, str):
        return value[:MAX_TEXT_CHARS]
    return _DROP


def status_number(status: dict[str, Any] | None, key: str) -> float | None:
    """A finite number from a cleaned status, or None."""
    value = (status or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
