"""`gpulab run [OPTIONS] -- CMD`: an interactive job, like `srun --pty`.

It queues CMD as an ordinary job whose program is the relay (`python -m gpulab.pty_relay`,
see that module), waits for placement while printing why the job waits, then attaches this
terminal to CMD's pseudo-terminal on the assigned GPUs:

- while waiting, Ctrl-C cancels the job (exit 130);
- once attached, the terminal is raw: Ctrl-C, Ctrl-Z and Ctrl-D go to CMD (a shell handles
  them as it would under `srun --pty`); window size changes follow;
- CMD's exit code is gpulab run's exit code; the job ends when CMD does;
- if this client dies or its terminal closes, CMD gets SIGHUP and the job ends; if it dies
  while the job waits, the job ends as soon as it starts, without running CMD.

The relay reaches back over a Unix socket in a 0700 directory of the user's, so the job
must run on this host (one-server setups; with several nodes, add `--node` for this host).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import termios
import tty
from pathlib import Path
from typing import Any

import click

from cli.context import EXIT_USAGE, Context, fail, pass_ctx
from gpulab.pty_relay import DATA, EOF, EXIT, SIZE, FrameReader, frame
from jobs.text import safe

FINAL = ("COMPLETED", "FAILED", "CANCELLED")
_POLL_S = 0.5  # how often the waiting client re-reads the job's reason (one small request)


@click.command(name="run", context_settings={"ignore_unknown_options": True})
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs on one node.")
@click.option("--mem", help="Memory per GPU (12GiB, 12G, 12000MiB). Without it: a whole idle GPU.")
@click.option("--name", help="Job name (default: the program's name).")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher starts first.")
@click.option("--time", "time_limit", help="Time limit: 30m, 2h, 1-12:00:00, 90:00.")
@click.option("--after", multiple=True, metavar="ID", help="Start after job ID completed OK (repeatable).")
@click.option("--after-any", multiple=True, metavar="ID", help="Start after job ID ended, however.")
@click.option("--exclusive", is_flag=True, help="Whole GPUs, whatever --mem says.")
@click.option("--node", metavar="NAME", help="Run only on this node (the job must run on this host).")
@click.option("--gpu-model", metavar="MODEL", help="GPU name must contain MODEL (A100, 'RTX 4090').")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def run_command(
    ctx: Context, /, command: tuple[str, ...], gpus: int, mem: str | None, name: str | None, priority: int,
    time_limit: str | None, **policy: Any,
) -> None:  # fmt: skip
    """Run CMD attached to this terminal on a GPU once placed: gpulab run --mem 8GiB -- bash"""
    from cli.main import build_spec  # cli.main registers this command: imported when called

    if command[0].startswith("-"):  # an option click did not know, before `--`
        fail(f"run: no such option: {command[0]} (put the program after --)", EXIT_USAGE)

    session_dir = Path(tempfile.mkdtemp(prefix="gpulab-run-", dir=os.environ.get("XDG_RUNTIME_DIR") or None))
    try:
        sock_path = session_dir / "s"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(1)
        relay = (sys.executable, "-m", "gpulab.pty_relay", str(sock_path), "--", *command)
        spec = build_spec(relay, gpus, mem, name or Path(command[0]).name, priority, time_limit, False, False,
                          "command", policy)  # fmt: skip
        client = ctx.client()
        body = spec.to_json()
        body["env"]["TERM"] = os.environ.get("TERM", "xterm")
        job_id = ctx.call(client.submit, body)
        sys.exit(Session(ctx, job_id, listener).run())
    finally:
        shutil.rmtree(session_dir, ignore_errors=True)


class Session:
    def __init__(self, ctx: Context, job_id: int, listener: socket.socket) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.listener = listener
        self.client = ctx.client()

    def say(self, message: str) -> None:
        click.echo(f"gpulab run: {message}", err=True)

    def run(self) -> int:
        try:
            conn = self._await_placement()
        except KeyboardInterrupt:
            return self._cancel("interrupted while waiting")
        if isinstance(conn, int):
            return conn
        return self._attached(conn)

    def _cancel(self, why: str) -> int:
        with contextlib.suppress(Exception):
            self.client.action(self.job_id, "cancel")
        self.say(f"{why}: cancelled job {self.job_id}")
        return 130

    def _await_placement(self) -> socket.socket | int:
        """The relay's connection, once the job runs; or an exit code if it ended first."""
        shown = ""
        self.listener.settimeout(_POLL_S)
        # A terminal that closes while we wait must not leave the job queued.
        signal.signal(signal.SIGHUP, _raise_interrupt)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                record = self.ctx.call(self.client.job, self.job_id)
                state = record["state"]
                if state in FINAL:
                    code = record.get("exit_code")
                    self.say(f"job {self.job_id} ended {state} {record.get('reason') or ''} without attaching "
                             f"(see gpulab logs {self.job_id}; the job must run on this host)")  # fmt: skip
                    return int(code) if code else 1
                line = f"job {self.job_id} {state}" + (
                    f": {record['reason']}" + (f" ({safe(record['detail'], 200)})" if record.get("detail") else "")
                    if record.get("reason") else ""
                )  # fmt: skip
                if line != shown:
                    self.say(line)
                    shown = line
                continue
            if _peer_uid(conn) != os.getuid():
                conn.close()  # only our own job's relay (the directory is 0700; belt and braces)
                continue
            record = self.ctx.call(self.client.job, self.job_id)
            gpus = ",".join(str(g["index"]) for g in record.get("gpus", []))
            self.say(f"job {self.job_id} running on {record.get('node')} GPU {gpus}")
            return conn

    def _attached(self, conn: socket.socket) -> int:
        stdin = sys.stdin.fileno()
        is_tty = os.isatty(stdin)
        saved = termios.tcgetattr(stdin) if is_tty else None
        if not is_tty:  # no raw terminal to carry Ctrl-C as a byte: forward the signal as one
            signal.signal(signal.SIGINT, lambda *_: conn.sendall(frame(DATA, b"\x03")))
        signal.signal(signal.SIGHUP, _raise_interrupt)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        if is_tty:
            signal.signal(signal.SIGWINCH, lambda *_: _send_size(conn, stdin))
            _send_size(conn, stdin)
            tty.setraw(stdin)
        code: int | None = None
        try:
            code = self._pump(conn, stdin)
        except KeyboardInterrupt:
            pass
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            conn.close()
        if code is not None:
            return code
        # No exit code: the job was cancelled or lost, or we were told to stop.
        record = self.ctx.call(self.client.wait, self.job_id, 30.0)
        self.say(f"job {self.job_id} ended {record['state']} {record.get('reason') or ''}".rstrip())
        exit_code = record.get("exit_code")
        return int(exit_code) if exit_code else 1

    def _pump(self, conn: socket.socket, stdin: int) -> int | None:
        reader = FrameReader()
        stdin_open = True
        out = sys.stdout.buffer
        while True:
            fds = [conn] + ([stdin] if stdin_open else [])
            try:
                readable, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if stdin in readable:
                data = os.read(stdin, 65536)
                if data:
                    conn.sendall(frame(DATA, data))
                else:
                    stdin_open = False
                    conn.sendall(frame(EOF))
            if conn in readable:
                data = conn.recv(65536)
                if not data:
                    return None
                for kind, payload in reader.feed(data):
                    if kind == DATA:
                        out.write(payload)
                        out.flush()
                    elif kind == EXIT and len(payload) == 4:
                        return int(struct.unpack("!i", payload)[0])


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _send_size(conn: socket.socket, fd: int) -> None:
    with contextlib.suppress(OSError):
        import fcntl

        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols = struct.unpack("HHHH", packed)[:2]
        conn.sendall(frame(SIZE, struct.pack("!HH", rows, cols)))
