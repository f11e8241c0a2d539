"""The worker's side of the shim fork server (the server itself: worker/shim.py, `--serve`).

One server per worker, started on the first launch: a `python -I -S shim.py ... --serve yes` child
of this worker, talked to over a SOCK_SEQPACKET socket pair. Each launch asks it to fork a
shim (`spawn`), handing it the shim's three fds; the reply carries a pidfd of that shim, so
this worker signals the shim and nothing else, even once its pid is reused. The server
reports each shim's wait status when it reaps it. `ServedShim` is what the runner holds:
the part of `subprocess.Popen` it uses (pid, stdin, poll, wait, send_signal).

If the server dies (it never should: only root can signal it), its shims see their parent
die and stop their jobs; a shim whose status can no longer come is reported as killed once
its pidfd says it is gone, and the next launch starts a new server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from worker.process_tree import CHILD_STARTS

log = logging.getLogger("gpulab.worker")

SPAWN_ANSWER_S = 30.0  # a fork: instant, unless the machine is frozen
LOST_STATUS = int(signal.SIGKILL)  # the wait status given to a shim whose server died before reporting it


class ShimServerError(RuntimeError):
    pass


class _Input:
    """The write end of the shim's stdin, as Popen.stdin is used by the runner."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class ServedShim:
    def __init__(self, pid: int, pidfd: int, stdin_w: int) -> None:
        self.pid = pid
        self.stdin: _Input | None = _Input(stdin_w)
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._done = threading.Event()

    def _exited(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self._done.set()
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self._pidfd = -1

    def _gone(self) -> bool:
        """Whether the process has exited (its pidfd is readable then)."""
        if self._pidfd < 0:
            return True
        return bool(select.select([self._pidfd], [], [], 0)[0])

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("gpulab shim", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Through the pidfd: never another process that got the pid after this one ended."""
        if self._done.is_set() or self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ShimServer:
    """A fork server of shims for this worker; `spawn` is thread-safe."""

    def __init__(self, shim_path: str, env: dict[str, str], argv_tags: list[str]) -> None:
        self.shim_path = shim_path
        self.env = env
        self.argv_tags = argv_tags  # --node N --state-dir D: to be found in a process listing
        self._lock = threading.Lock()  # one spawn at a time: replies come in order
        self._state = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._replies: list[tuple[str, int | None]] = []
        self._reply = threading.Condition(self._state)
        self._shims: dict[int, ServedShim] = {}
        self._early: dict[int, int] = {}  # exit reports that came before their spawn reply
        self._seq = 0  # the number of the last spawn request
        self._dropped: set[int] = set()  # shims whose spawn was given up on: their exits are dropped

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> socket.socket:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [sys.executable, "-I", "-S", self.shim_path, *self.argv_tags]
            argv += ["--worker-pid", str(os.getpid()), "--serve", "yes"]
            with CHILD_STARTS:  # until its pid is known: the orphan sweep spares it then
                self._proc = subprocess.Popen(
                    argv,
                    cwd="/",
                    env=self.env,
                    stdin=theirs.fileno(),
                    stdout=subprocess.DEVNULL,
                    stderr=None,  # the worker's own log
                    start_new_session=True,
                    close_fds=True,
                )
        finally:
            theirs.close()
        self._sock = mine
        threading.Thread(target=self._read, args=(mine, self._proc), name="shim-server", daemon=True).start()
        return mine

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(4))
            except OSError:
                data, ancdata = b"", []
            if not data:
                break
            fds = [
                int.from_bytes(payload[i : i + 4], sys.byteorder)
                for level, kind, payload in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for i in range(0, len(payload) - len(payload) % 4, 4)
            ]
            word, _, rest = data.decode(errors="replace").partition(" ")
            with self._state:
                if word == "exit":
                    pid_text, _, status_text = rest.partition(" ")
                    pid, status = int(pid_text), int(status_text)
                    shim = self._shims.pop(pid, None)
                    if shim is not None:
                        shim._exited(status)
                    elif pid in self._dropped:
                        self._dropped.discard(pid)
                    else:
                        self._early[pid] = status
                else:
                    self._replies.append((data.decode(errors="replace"), fds[0] if fds else None))
                    for extra in fds[1:]:
                        os.close(extra)
                    self._reply.notify_all()
        # The server is gone: its shims die of it (parent-death signal); report them as
        # killed once each is gone, and let the next spawn start a new server.
        proc.wait()
        log.warning("worker: the shim server exited (%s); its jobs stop", proc.returncode)
        with self._state:
            if self._sock is sock:
                self._sock = None
            orphans = list(self._shims.values())
            self._shims.clear()
            self._reply.notify_all()
        with contextlib.suppress(OSError):
            sock.close()
        # All watched at once: one that its job SIGSTOPped (same user) goes only once the
        # worker kills it (a cancel), and the others' ends waited behind it.
        while orphans:
            for shim in [s for s in orphans if s._gone()]:
                shim._exited(LOST_STATUS)
                orphans.remove(shim)
            if orphans:
                time.sleep(0.05)  # a pidfd turns readable when its shim exits; each is killing its tree

    def spawn(self, request: dict[str, object], stdin_r: int, report_w: int, log_fd: int, stdin_w: int) -> ServedShim:
        """A new shim, forked by the server as the request says; ShimServerError if not."""
        with self._lock:
            with self._state:
                sock = self._sock
            if sock is None:
                sock = self._start()
            self._seq += 1
            seq = str(self._seq)
            payload = ("spawn " + json.dumps({**request, "seq": self._seq})).encode()
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (stdin_r, report_w, log_fd))
            try:
                sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as exc:
                raise ShimServerError(f"the shim server does not take requests: {exc.strerror or exc}") from None
            deadline = time.monotonic() + SPAWN_ANSWER_S
            with self._state:
                while True:
                    while not self._replies:
                        if self._sock is not sock:
                            raise ShimServerError("the shim server exited")
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise ShimServerError(f"the shim server did not answer within {SPAWN_ANSWER_S:.0f}s")
                        self._reply.wait(remaining)
                    text, pidfd = self._replies.pop(0)
                    word, _, rest = text.partition(" ")
                    answered, _, rest = rest.partition(" ")
                    if answered == seq or answered == "-":
                        break
                    self._drop(word, rest, pidfd)  # the answer to a spawn given up on
                if word != "spawned" or pidfd is None or not rest.isdigit():
                    if pidfd is not None:
                        os.close(pidfd)
                    raise ShimServerError(f"the shim server said {text!r}")
                shim = ServedShim(int(rest), pidfd, stdin_w)
                early = self._early.pop(shim.pid, None)
                if early is not None:
                    shim._exited(early)
                else:
                    self._shims[shim.pid] = shim
                return shim

    def _drop(self, word: str, rest: str, pidfd: int | None) -> None:
        """A late answer (under _state): its shim, whose caller gave up, is killed."""
        if pidfd is None:
            return
        if word == "spawned" and rest.isdigit():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            pid = int(rest)
            if self._early.pop(pid, None) is None:
                self._dropped.add(pid)
        os.close(pidfd)

    def close(self) -> None:
        """Shutdown (every job already stopped): EOF tells the server to exit."""
        with self._state:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
