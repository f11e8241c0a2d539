"""`python -m gpulab.pty_relay SOCKET -- CMD...`: the job side of `gpulab run` (cli/run.py).

It is the command of an ordinary gpulab job, so it runs as the user, under the worker's shim,
on the assigned GPUs, with the job's lease, limits and cancel like any job. It connects back
to the `gpulab run` client's Unix socket (in a 0700 directory of the same user, so only that
user can reach it), starts CMD on a new pseudo-terminal, and relays bytes both ways:

- the client's keys go to the terminal, so Ctrl-C reaches CMD as SIGINT (like `srun --pty`);
- window size changes are applied to the terminal (CMD gets SIGWINCH);
- when CMD exits, its exit code is sent to the client, and the relay exits with it, which
  ends the job: the allocation lasts exactly as long as the session;
- when the client goes away (closed, killed, its host's terminal gone), CMD gets SIGHUP, as
  from a closed terminal, then SIGKILL if it ignores that, and the job ends with 129;
- when the client is gone before the job starts (killed while pending), the connection is
  refused at once and the job ends with 129 without running CMD.

Stdlib only, one process, no threads. Frames on the socket: 1 type byte, 4-byte big-endian
length, payload. Client -> relay: DATA (keys), SIZE (rows, cols as 2x uint16), EOF (stdin
closed). Relay -> client: DATA (output), EXIT (int32 exit code).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import termios
import time

DATA, SIZE, EOF, EXIT = b"d", b"w", b"e", b"x"
_HEADER = struct.Struct("!cI")
MAX_FRAME = 1 << 20
HANGUP_EXIT = 129  # 128 + SIGHUP: what a shell reports for a session whose terminal went away
_HUP_GRACE_S = 2.0


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


class FrameReader:
    """Frames from a stream of bytes, however the stream splits them."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes")
            if len(self._buf) < _HEADER.size + length:
                break
            frames.append((kind, self._buf[_HEADER.size : _HEADER.size + length]))
            self._buf = self._buf[_HEADER.size + length :]
        return frames


def set_winsize(fd: int, rows: int, cols: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def relay(sock_path: str, argv: list[str]) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
    except OSError as exc:
        print(f"gpulab run: the session that asked for this job is gone ({exc.strerror}); not starting",
              file=sys.stderr, flush=True)  # fmt: skip
        return HANGUP_EXIT
    pid, master = _spawn(argv)
    try:
        return _pump(sock, master, pid)
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _spawn(argv: list[str]) -> tuple[int, int]:
    pid, master = os.forkpty()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"gpulab run: cannot run {argv[0]}: {exc.strerror}\r\n".encode())
            os._exit(127)
    return pid, master


def _pump(sock: socket.socket, master: int, pid: int) -> int:
    reader = FrameReader()
    client_open = True
    status: int | None = None
    while True:
        fds = [master] + ([sock] if client_open else [])
        try:
            readable, _, _ = select.select(fds, [], [], 0.5)
        except InterruptedError:
            continue
        if master in readable:
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every process holding the terminal has exited
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                _, status = os.waitpid(pid, 0)
                break
            if client_open:
                try:
                    sock.sendall(frame(DATA, data))
                except OSError:
                    client_open = False
        if client_open and sock in readable:
            try:
                incoming = sock.recv(65536)
            except OSError:
                incoming = b""
            if not incoming:
                client_open = False
            else:
                try:
                    frames = reader.feed(incoming)
                except ValueError:
                    client_open = False
                    frames = []
                for kind, payload in frames:
                    _apply(master, kind, payload)
        if not client_open:
            return _hang_up(master, pid)
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:  # the program ended; keep reading until its terminal is drained (EIO)
            status = wait_status
            _drain(sock, master)
            break
    code = exit_code(status)
    with contextlib.suppress(OSError):
        sock.sendall(frame(EXIT, struct.pack("!i", code)))
        sock.shutdown(socket.SHUT_WR)
    return code


def _apply(master: int, kind: bytes, payload: bytes) -> None:
    if kind == DATA:
        os.write(master, payload)
    elif kind == SIZE and len(payload) == 4:
        rows, cols = struct.unpack("!HH", payload)
        set_winsize(master, rows, cols)
    elif kind == EOF:
        os.write(master, b"\x04")  # end of input, as Ctrl-D on a terminal in canonical mode


def _drain(sock: socket.socket, master: int) -> None:
    while True:
        try:
            readable, _, _ = select.select([master], [], [], 0.2)
            data = os.read(master, 65536) if readable else b""
        except OSError:
            return
        if not data:
            return
        with contextlib.suppress(OSError):
            sock.sendall(frame(DATA, data))


def _hang_up(master: int, pid: int) -> int:
    """The client is gone: hang up the terminal (SIGHUP to the program's session, as a closed
    terminal does), then SIGKILL whatever ignored it."""
    with contextlib.suppress(OSError):
        os.close(master)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGHUP)
    deadline = time.monotonic() + _HUP_GRACE_S
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return HANGUP_EXIT
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return HANGUP_EXIT


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m gpulab.pty_relay SOCKET -- CMD [ARGS...]", file=sys.stderr)
        return 2
    return relay(argv[0], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
