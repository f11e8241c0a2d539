"""One daemon per state directory, and a state directory only its owner can change.

A second `gpulab scheduler` (or `gpulab up`) on the same state directory would take over the
API socket path and delete it on exit, cutting the running scheduler off from every user; a
second embedded redis-server on the same data directory would write the same AOF. So each
holds an flock on a lock file there for its whole life: the kernel drops it when the
process ends, however it ends (no stale lock after a crash), and the file says who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("gpulab.instance")


class AlreadyRunning(RuntimeError):
    """Another live process holds the lock; `str()` is the one line to print."""


class LockUnavailable(RuntimeError):
    """The lock file cannot be opened (permissions, a symlink planted in its place)."""


class InstanceLock:
    """An exclusive flock on `path` (mode 0600: no other user can open it, so no other user
    can take it first and keep the daemon from starting)."""

    def __init__(self, path: Path, what: str, where: Path) -> None:
        self.path = path
        self.what = what  # "gpulab scheduler"
        self.where = where  # the directory named in the message
        self.fd: int | None = None

    def acquire(self) -> InstanceLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            why = "a symlink is in its place" if exc.errno == errno.ELOOP else exc.strerror
            raise LockUnavailable(
                f"cannot open the lock file {self.path} ({why}); run {self.what} as the owner of {self.where}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(f"{self.what} is already running (pid {holder}) on {self.where}") from None
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.set_pid(os.getpid())
        return self

    def set_pid(self, pid: int) -> None:
        """Name the process that holds the lock (a child it was handed to: redis-server)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def refusal(exc: AlreadyRunning | LockUnavailable) -> str:
    """The one line a daemon that will not start prints."""
    return str(exc) if isinstance(exc, AlreadyRunning) else f"gpulab: {exc}"


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


def scheduler_lock(state_dir: Path) -> InstanceLock:
    return InstanceLock(state_dir / "scheduler.lock", "gpulab scheduler", state_dir)


def socket_lock(socket_path: Path) -> InstanceLock:
    """Held by the scheduler that serves `socket_path`, next to it. Two schedulers with state
    directories of their own, given one socket path and started at once, each found no live
    socket there, and one could unlink the other's between its bind and its listen (finding
    a stale socket and replacing it are not one step)."""
    return InstanceLock(socket_path.with_name(socket_path.name + ".lock"), "gpulab scheduler", socket_path)


def private_dir(path: Path, mode: int = 0o755) -> Path:
    """Create `path` (and parents) for a daemon's state, and make sure no one else can write
    to it (a directory others can write to lets them replace the API socket or the lock
    file): group and others lose write permission on one we own; a shared one (like /tmp) or
    one owned by another user that others can write to is refused."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    info = path.stat()
    current = stat.S_IMODE(info.st_mode)
    if current & 0o002 and (current & stat.S_ISVTX or info.st_uid != os.geteuid()):
        raise LockUnavailable(f"{path} is writable by every user; give gpulab a directory of its own")
    if current & 0o022 and info.st_uid == os.geteuid():
        os.chmod(path, current & ~0o022)
        log.warning("%s was writable by group or others; made it %o", path, current & ~0o022)
    return path
