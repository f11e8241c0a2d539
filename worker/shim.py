"""The per-job shim: the one process between the worker and a job's command.

The worker runs it as the job's user (never the user's cwd, never the user's environment):

    python -I -S /abs/worker/shim.py --node N --state-dir D --job J --attempt A
                                     --worker-pid P --lease-ttl T --kill-grace G --report-fd FD

(node, state dir, job and attempt are for finding it in a process listing).

`-I -S` and an absolute path: nothing in a user's directory or environment can shadow a
module it imports, and it imports only the standard library. It exists so that a job runs
exactly once and its whole tree dies when it should, whatever happens to the worker:

- Gate. It enters the job's directory itself (as the user: root never follows a path a user
  controls), forks the command's process, reports `ready <pid>` and starts it only when the
  worker says `go`, which the worker sends only after Redis accepted the ASSIGNED -> RUNNING
  transition (guarded by attempt and fencing token). If the worker refuses, dies or goes
  quiet first, the command never starts.
- Subreaper. Everything the command starts, double-forked and setsid'd escapees included,
  stays in this process's tree, so stopping the job stops all of it.
- Parent death. PR_SET_PDEATHSIG (and EOF on its stdin) tell it when the worker died
  (kill -9): it stops the tree.
- Self-fencing. After every lease renewal the worker sends `lease <t>` (its CLOCK_MONOTONIC
  before the renewal, so the lease in Redis lasts at least until t + ttl). When no renewal
  has been heard for 0.75 * ttl, a frozen or cut-off worker can no longer keep the job's
  lease: the shim stops the tree (SIGTERM) and SIGKILLs it by t + 0.9 * ttl, so the job is
  dead before the scheduler can see the lease lapse and run it elsewhere.

Worker -> shim (stdin), one line each: `launch <json argv/env/cwd>`, `lease <t>`, `go <t>`.
Shim -> worker (report fd): `ready <pid>`, `started`, `fail <why>`, `lost <why>`.
It exits with its command's status (re-raising the signal that killed it), or
LAUNCH_FAILED_EXIT after `fail`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

LAUNCH_FAILED_EXIT = 111  # with a `fail` line: the command could not be started
ABORTED_EXIT = 112  # the worker went away or said no before `go`: nothing was started
FENCE_FRACTION = 0.75  # of the lease TTL without a renewal heard: stop the job
KILL_FRACTION = 0.9  # of the lease TTL after the last renewal: SIGKILL whatever is left
MAX_LINE = 4 * 2**20  # the launch line (argv + env, JSON) is far below this
DRAIN_S = 30.0  # at most this long killing and reaping leftovers after the command ended

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PDEATH_SIGNAL = signal.SIGHUP  # the worker died; checked against getppid() (a thread's exit also sends it)

# What the command's process sets back to the default before exec (the shim handles or, as
# Python does, ignores them; an ignored SIGPIPE would survive exec).
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, PDEATH_SIGNAL, signal.SIGPIPE, signal.SIGXFSZ)

_libc = ctypes.CDLL(None, use_errno=True)

# The gated fork in C (worker/native/gate.c, built by scripts/bootstrap): the same steps as
# Shim.child_side without running Python between fork and exec, ~0.5 ms of CPU less per job.
# Used only if it is as trusted as this file: same owner, neither it nor its folder writable
# by anyone else (the fork server that loads it runs as root).
NATIVE_GATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "libgpulab_gate.so")


def _load_native_gate() -> Any:
    try:
        mine = os.stat(os.path.abspath(__file__))
        trusted = all(
            st.st_uid == mine.st_uid and not st.st_mode & 0o022
            for st in (os.stat(NATIVE_GATE_PATH), os.stat(os.path.dirname(NATIVE_GATE_PATH)))
        )
        function = ctypes.CDLL(NATIVE_GATE_PATH).gpulab_fork_gated if trusted else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        strings = ctypes.POINTER(ctypes.c_char_p)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_int] * 5 + [strings] * 3
        function.argtypes += [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    return function


NATIVE_GATE = _load_native_gate()
_RESET_SIGNALS = ((ctypes.c_int * len(RESET_SIGNALS))(*RESET_SIGNALS), len(RESET_SIGNALS))


def native_gate_call(argv: list[str], env: dict[str, str]) -> tuple[Any, ...] | None:
    """The native gate's arguments for this command (PATH candidates, argv, envp, the error
    line's prefix), as os.execvpe would search and fail; None where os.execvpe itself would
    refuse the input (a NUL byte, an unencodable name, a bad variable name, an empty argv[0]):
    the Python gate then fails exactly as before."""
    try:
        args = [os.fsencode(a) for a in argv]
        pairs = [(os.fsencode(k), os.fsencode(v)) for k, v in env.items()]
        if os.path.dirname(argv[0]):
            candidates = [args[0]]
        else:
            candidates = [os.path.join(os.fsencode(d), args[0]) for d in os.get_exec_path(env)]
    except (UnicodeError, ValueError):
        return None
    if not args[0] or any(b"\0" in a for a in args) or any(b"\0" in k + v for k, v in pairs):
        return None
    if any(not k or b"=" in k[1:] for k, _ in pairs):  # what os.execve refuses
        return None
    prefix = f"cannot start {argv[0]!r}: ".encode(errors="replace")
    return _strings(candidates), _strings(args), _strings([k + b"=" + v for k, v in pairs]), prefix, len(prefix)


def _strings(items: list[bytes]) -> Any:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Options:
    def __init__(self, argv: list[str]) -> None:
        values: dict[str, str] = {}
        it = iter(argv)
        for flag in it:
            if not flag.startswith("--"):
                raise SystemExit(f"gpulab shim: unexpected argument {flag!r}")
            values[flag[2:]] = next(it)
        self._take(values)

    @classmethod
    def from_values(cls, values: dict[str, str]) -> Options:
        opts = cls.__new__(cls)
        opts._take(values)
        return opts

    def _take(self, values: dict[str, str]) -> None:
        self.node = values["node"]
        self.job = values["job"]
        self.attempt = values["attempt"]
        self.worker_pid = int(values["worker-pid"])
        self.lease_ttl = float(values["lease-ttl"])
        self.kill_grace = float(values["kill-grace"])
        self.report_fd = int(values["report-fd"])


class Shim:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.shim_pid = os.getpid()
        self.buffer = b""
        self.stdin_open = True
        self.signals: list[int] = []
        self.last_lease = time.monotonic()  # the assignment's lease covers the start-up
        self.child = 0  # the command's pid (forked at `ready`, exec'd at `go`)
        self.child_status: int | None = None  # its wait status once reaped
        self.gate_w = -1  # write end of the child's gate: one byte = exec
        self.err_r = -1  # the child's close-on-exec pipe: an error message, or EOF once exec'd
        self.started = False
        self.lost = ""  # why the shim stopped the job on its own
        self.stopping = False
        self.kill_at: float | None = None
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, PDEATH_SIGNAL):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    # ---- talking to the worker ---------------------------------------------------------------
    def report(self, line: str) -> None:
        """One line to the worker. Never blocks: a worker that does not read (frozen) loses it."""
        data = (line.replace("\n", " ")[:1000] + "\n").encode(errors="replace")
        with contextlib.suppress(OSError):
            os.write(self.opts.report_fd, data)

    def read_lines(self) -> list[str] | None:
        """The complete lines now readable on stdin; None at EOF (the worker closed it or died)."""
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.stdin_open = False
            return None
        self.buffer += data
        if len(self.buffer) > MAX_LINE:
            self.stdin_open = False
            return None
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode("utf-8", "surrogateescape") for line in lines]

    # ---- the tree ------------------------------------------------------------------------------
    def descendants(self) -> list[int]:
        """Every live process below this one (subreaper: escapees reparent to it)."""
        parent_of: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rpartition(b")")[2].split()
            if len(fields) > 1:
                parent_of[int(name)] = int(fields[1])
        me = os.getpid()
        found: set[int] = set()
        frontier = {me}
        while frontier:
            frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier and pid not in found}
            found |= frontier
        return sorted(found)

    def signal_tree(self, sig: int) -> None:
        if self.child:
            with contextlib.suppress(OSError):
                os.killpg(self.child, sig)  # the command leads its own session and group
        for pid in self.descendants():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def reap(self) -> bool:
        """Collect every exited child (orphans too: the shim is their subreaper); return
        whether any child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.child:
                self.child_status = status

    # ---- stopping ------------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        """SIGTERM the tree; SIGKILL after the kill grace (sooner when the lease runs out)."""
        now = time.monotonic()
        if self.lost:
            deadline = min(now + self.opts.kill_grace, max(now, self.last_lease + KILL_FRACTION * self.opts.lease_ttl))
        else:
            deadline = now + self.opts.kill_grace
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)
        if not self.stopping:
            self.stopping = True
            self.signal_tree(signal.SIGTERM)

    def lose(self, why: str) -> None:
        """The worker is gone or cannot hold the lease: the job must die before the lease does."""
        if not self.lost:
            self.lost = why
            self.report(f"lost {why}")
        self.stop(why)

    # ---- phases --------------------------------------------------------------------------------
    def wait_event(self, timeout: float | None) -> list[str] | None:
        """Sleep until stdin, a signal or the timeout; handle signals; return stdin's lines."""
        fds = [self.wake_r] + ([0] if self.stdin_open else [])
        try:
            readable, _, _ = select.select(fds, [], [], None if timeout is None else max(0.0, timeout))
        except InterruptedError:
            readable = []
        if self.wake_r in readable:
            try:
                while os.read(self.wake_r, 512):
                    pass
            except OSError:
                pass
        signals, self.signals = self.signals, []
        for signum in signals:
            if signum == PDEATH_SIGNAL:
                if os.getppid() != self.opts.worker_pid:
                    self.lose("its worker died")
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop("stop requested")
        if signal.SIGCHLD in signals or self.child:
            self.reap()
        if 0 in readable:
            return self.read_lines()
        return []

    def fence_deadline(self) -> float:
        return self.last_lease + FENCE_FRACTION * self.opts.lease_ttl

    def on_lease(self, text: str) -> None:
        with contextlib.suppress(ValueError):
            self.last_lease = max(self.last_lease, float(text))

    def run(self) -> int:
        launch = self.await_launch()
        if launch is None:
            return ABORTED_EXIT
        failure = self.prepare(launch)
        if failure:
            self.report(f"fail {failure}")
            return LAUNCH_FAILED_EXIT
        self.report(f"ready {self.child}")
        if not self.await_go():
            self.abort_child()
            return ABORTED_EXIT
        failure = self.release_child()
        if failure:
            self.report(f"fail {failure}")
            self.drain()
            return LAUNCH_FAILED_EXIT
        self.started = True
        self.report("started")
        self.supervise()
        if not self.stopping:
            # Nobody asked it to stop before it exited: its result is its own, even if a stop
            # (a lapsed lease seen late by a worker that was frozen) reaches the worker next.
            self.report("ended")
        self.drain()
        return self.exit_with_child_status()

    def await_launch(self) -> dict[str, Any] | None:
        while True:
            timeout = self.fence_deadline() - time.monotonic()
            if timeout <= 0 or self.stopping or self.lost:
                return None
            lines = self.wait_event(timeout)
            if lines is None:
                return None
            for line in lines:
                word, _, rest = line.partition(" ")
                if word == "lease":
                    self.on_lease(rest)
                elif word == "launch":
                    try:
                        data = json.loads(rest)
                    except ValueError:
                        return None
                    return data if isinstance(data, dict) else None

    def prepare(self, launch: dict[str, Any]) -> str:
        """Enter the job's directory as its user and fork the command, held at its gate.
        Returns why it cannot start ("" when it can)."""
        cwd = launch.get("cwd")
        argv = launch.get("argv")
        env = launch.get("env")
        if not isinstance(cwd, str) or not isinstance(argv, list) or not argv or not isinstance(env, dict):
            return "malformed launch request"
        try:
            os.chdir(cwd)
        except (OSError, UnicodeError, ValueError) as exc:
            return f"cannot enter directory {cwd!r}: {_why(exc)}"
        gate_r, gate_w = os.pipe()
        err_r, err_w = os.pipe()
        args, environ = [str(a) for a in argv], {str(k): str(v) for k, v in env.items()}
        native = native_gate_call(args, environ) if NATIVE_GATE is not None else None
        if native is not None:
            pid = NATIVE_GATE(gate_r, gate_w, err_r, err_w, self.shim_pid, *native, *_RESET_SIGNALS)
            if pid < 0:
                raise OSError(-pid, os.strerror(-pid))
        else:
            pid = os.fork()
        if pid == 0:  # the command's process, until exec (the Python gate)
            try:
                os.close(gate_w)
                os.close(err_r)
                self.child_side(gate_r, err_w, args, environ)
            finally:
                os._exit(127)
        os.close(gate_r)
        os.close(err_w)
        self.child = pid
        self.gate_w = gate_w
        self.err_r = err_r
        return ""

    def child_side(self, gate_r: int, err_w: int, argv: list[str], env: dict[str, str]) -> None:
        """In the forked child: own session (like the job had before the shim), die with the
        shim, stdin from /dev/null, default signals; exec at the gate's byte, exit at its EOF."""
        signal.set_wakeup_fd(-1)
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.shim_pid:
            return  # the shim is already gone
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if os.read(gate_r, 1) != b"g":
            return
        try:
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:  # the shim reports it as a launch failure
            os.write(err_w, f"cannot start {argv[0]!r}: {_why(exc)}".encode(errors="replace")[:2000])

    def await_go(self) -> bool:
        while True:
            timeout = self.fence_deadline() - time.monotonic()
            if timeout <= 0 or self.stopping or self.lost:
                return False
            lines = self.wait_event(timeout)
            if lines is None:
                return False
            for line in lines:
                word, _, rest = line.partition(" ")
                if word in ("lease", "go"):
                    self.on_lease(rest)
                if word == "go":
                    return True

    def abort_child(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.child, signal.SIGKILL)
        self.drain()

    def release_child(self) -> str:
        """Open the gate; "" once exec succeeded (its close-on-exec pipe closed), else why not."""
        with contextlib.suppress(OSError):
            os.write(self.gate_w, b"g")
        os.close(self.gate_w)
        chunks = []
        while True:
            try:
                chunk = os.read(self.err_r, 4096)
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self.err_r)
        return b"".join(chunks).decode(errors="replace")

    def supervise(self) -> None:
        """Until the command exits: lease renewals, stop requests, the worker's death."""
        while self.child_status is None:
            now = time.monotonic()
            deadlines = [] if self.lost else [self.fence_deadline()]
            if self.kill_at is not None:
                deadlines.append(self.kill_at)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            lines = self.wait_event(timeout)
            if lines is None:
                self.lose("its worker closed the pipe (it died)")
            for line in lines or []:
                word, _, rest = line.partition(" ")
                if word == "lease":
                    self.on_lease(rest)
            now = time.monotonic()
            if not self.lost and now >= self.fence_deadline():
                heard = now - self.last_lease
                self.lose(f"no lease renewal from its worker for {heard:.1f}s (lease {self.opts.lease_ttl:g}s)")
            if self.kill_at is not None and now >= self.kill_at and self.child_status is None:
                self.signal_tree(signal.SIGKILL)
                self.kill_at = now + 1.0  # again, for anything started meanwhile

    def drain(self) -> None:
        """The command ended: everything it left behind is killed and reaped. As subreaper
        the shim inherits every orphan, so no child left means no descendant left."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            # Reaped first: a command that left nothing behind (the usual end) costs no walk
            # of /proc (thousands of entries on a busy node, once per job).
            if not self.reap():
                return
            for pid in self.descendants():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not self.reap():
                return
            try:  # SIGCHLD writes to the wake pipe: no busy loop
                select.select([self.wake_r], [], [], 0.1)
                while os.read(self.wake_r, 512):
                    pass
            except OSError:
                pass

    def exit_with_child_status(self) -> int:
        if self.child_status is None:  # not reaped within DRAIN_S (stuck in the kernel)
            return 1
        status = self.child_status
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.set_wakeup_fd(-1)
            try:
                prctl(PR_SET_DUMPABLE, 0)  # re-raising SIGSEGV etc. must not dump the shim's core
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            except (OSError, ValueError):
                pass
            sys.stdout.flush()
            os.kill(os.getpid(), sig)
            return 128 + sig  # a signal whose default is not to terminate
        return os.waitstatus_to_exitcode(status)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"[:300]


def main(argv: list[str]) -> int:
    if argv == ["--self-check"]:  # the worker checks that a user can run this interpreter and file
        return 0
    if argv[-2:] == ["--serve", "yes"]:
        return serve(argv[:-2])
    return run_shim(Options(argv))


def run_shim(opts: Options) -> int:
    """The shim proper, once it is the job's user with its fds in place (exec'd or forked)."""
    os.set_inheritable(opts.report_fd, False)  # the command never gets the worker's pipe
    os.set_blocking(opts.report_fd, False)
    os.set_blocking(0, False)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_PDEATHSIG, PDEATH_SIGNAL)  # after the uid change (Popen did it before exec)
    # Not dumpable: the job (same uid) cannot ptrace the shim or open its /proc files, so it
    # cannot forge what the shim tells the worker. The command's exec resets this for itself.
    prctl(PR_SET_DUMPABLE, 0)
    shim = Shim(opts)
    if os.getppid() != opts.worker_pid:  # the worker died before PDEATHSIG was armed
        return ABORTED_EXIT
    try:
        return shim.run()
    except BaseException as exc:  # never leave a tree behind, whatever went wrong here
        shim.report(f"fail gpulab shim error: {_why(exc)}")
        if shim.child:
            shim.signal_tree(signal.SIGKILL)
            shim.drain()
        return LAUNCH_FAILED_EXIT if not shim.started else 1


# ---- the fork server ---------------------------------------------------------------------------
# Starting a Python interpreter per job costs ~36 ms of CPU; forking this already-started one
# costs well under a millisecond. The worker starts one server (as itself: root on a shared
# node), over a SOCK_SEQPACKET socket on fd 0:
#
#     python -I -S /abs/worker/shim.py --node N --state-dir D --worker-pid P --serve yes
#
# (the shims it forks keep that command line: a restarted worker finds them like exec'd ones)
#
# Worker -> server: `spawn <json>` with three fds (SCM_RIGHTS): the shim's stdin, its report
# pipe and the job's log. The json: seq (the request's number), job, attempt,
# uid/gid/groups/umask (null: stay as is), lease_ttl, kill_grace. Server -> worker:
# `spawned <seq> <pid>` with a pidfd of the new shim (so the worker signals that process and
# no other, even after the pid is reused), or `error <seq> <why>` (seq `-` if unreadable); and
# `exit <pid> <wait status>` for every shim it reaped. The seq lets the worker drop an answer
# that came after it gave up on that request (each later spawn took the previous one's).
# The forked child drops to the job's user (setgroups, setresgid, setresuid: exactly what
# Popen's user/group/extra_groups did), leads its own session, has only its three fds and
# then is a shim like an exec'd one (run_shim: subreaper, parent-death signal and
# non-dumpable set after the uid change, which clears them), with the server as the parent
# it watches. The server dies with its worker (parent-death signal, checked against the
# worker's pid, and EOF on its socket), and each shim with the server, so a job still dies
# with its worker. The server never reads anything a job wrote: only the worker talks to it.

SERVER_FD = 0
MAX_REQUEST = 65536


def serve(argv: list[str]) -> int:
    values = dict(zip(argv[::2], argv[1::2], strict=False))
    worker_pid = int(values["--worker-pid"])
    sock = socket.socket(fileno=SERVER_FD)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGCHLD, PDEATH_SIGNAL):
        signal.signal(sig, lambda _s, _f: None)
    prctl(PR_SET_PDEATHSIG, PDEATH_SIGNAL)
    if os.getppid() != worker_pid:  # the worker died before PDEATHSIG was armed
        return ABORTED_EXIT
    gc.freeze()  # the forked shims' collections skip these objects: fewer pages copied per fork
    while os.getppid() == worker_pid:
        try:
            readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            with contextlib.suppress(OSError):
                while os.read(wake_r, 512):
                    pass
            _report_exits(sock)
        if SERVER_FD in readable:
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * 4))
            except InterruptedError:
                continue
            if not data:
                return 0  # the worker closed its end (shut down, or died)
            fds = _received_fds(ancdata)
            try:
                _spawn(sock, data, fds)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
    return 0  # the worker died: every shim's parent-death signal follows this exit


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4))
    return fds


def _send(sock: socket.socket, text: str, fds: tuple[int, ...] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))]
    with contextlib.suppress(OSError):
        sock.sendmsg([text.encode()], ancillary if fds else [])


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, f"exit {pid} {status}")


def _spawn(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    word, _, rest = data.decode(errors="replace").partition(" ")
    try:
        request = json.loads(rest) if word == "spawn" else None
    except ValueError:
        request = None
    seq = request.get("seq") if isinstance(request, dict) else None
    tag = str(seq) if isinstance(seq, int) else "-"
    if not isinstance(request, dict) or len(fds) != 3:
        _send(sock, f"error {tag} malformed spawn request")
        return
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = LAUNCH_FAILED_EXIT
        try:
            code = _become_shim(request, fds, server_pid)
        finally:
            os._exit(code)
    try:
        pidfd = os.pidfd_open(pid)  # not reaped yet (only this loop reaps): it is the shim
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        _send(sock, f"error {tag} cannot hold the shim: {_why(exc)}")
        return
    try:
        _send(sock, f"spawned {tag} {pid}", (pidfd,))
    finally:
        os.close(pidfd)


def _become_shim(request: dict[str, Any], fds: list[int], parent: int) -> int:
    """In the forked child: the job's user, its own session, stdin/stdout+stderr/report on
    0/1/2/3 and no other fd, default signal handling; then the shim."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, PDEATH_SIGNAL):
        signal.signal(sig, signal.SIG_DFL)
    stdin_r, report_w, log_fd = fds
    os.setsid()
    moved = [os.dup(fd) for fd in (stdin_r, log_fd, report_w)]  # none of them may be 0-3 now
    for target, fd in zip((0, 1, 3), moved, strict=True):
        os.dup2(fd, target)
    os.dup2(1, 2)
    # Every other fd goes: the server's socket and wake pipe too (their Python objects live
    # on in the server's frames, unused: this process ends with os._exit, never closing them).
    os.closerange(4, max(os.sysconf("SC_OPEN_MAX"), 65536))
    if request.get("uid") is not None:
        try:
            uid, gid = int(request["uid"]), int(request["gid"])
            os.setgroups([int(g) for g in request.get("groups") or []])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except (OSError, TypeError, ValueError) as exc:
            os.write(3, f"fail cannot become the job's user: {_why(exc)}\n".encode())
            return LAUNCH_FAILED_EXIT
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or (uid != 0 and _can_regain_root()):
            os.write(3, f"fail still privileged after becoming uid {uid}\n".encode())
            return LAUNCH_FAILED_EXIT
    umask = request.get("umask")
    if isinstance(umask, int) and umask >= 0:
        os.umask(umask)
    os.chdir("/")
    opts = Options.from_values(
        {
            "node": str(request.get("node", "")),
            "job": str(request.get("job", "")),
            "attempt": str(request.get("attempt", "")),
            "worker-pid": str(parent),  # the parent whose death it watches: the server
            "lease-ttl": str(request.get("lease_ttl")),
            "kill-grace": str(request.get("kill_grace")),
            "report-fd": "3",
        }
    )
    return run_shim(opts)


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
