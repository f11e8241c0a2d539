"""`gpulab up`: a whole single-server stack in one foreground process tree.

Starts a private redis-server when the configured Redis is local and not answering, then
the scheduler and one worker as child processes (their output prefixed), and stops them in
reverse order on Ctrl-C / SIGTERM.

One stack per state directory: `up` holds `<state_dir>/up.lock`, and starts nothing while a
scheduler holds the state directory's lock (scheduler/instance.py); it says so and exits 1.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from jobs.config import Config
from jobs.daemons import StopSignals
from scheduler.instance import AlreadyRunning, InstanceLock, LockUnavailable, private_dir, refusal, scheduler_lock
from scheduler.redis_server import RedisServer, RedisServerError, is_local, reachable

READY_TIMEOUT_S = 60.0


def embedded_password(state_dir: Path) -> Path:
    """The embedded Redis' password in `<state_dir>/redis.password` (0600), made once."""
    path = state_dir / "redis.password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    return path


def _nvml_has_gpus() -> bool:
    try:
        from worker.nvml_probe import NvmlProbe

        probe = NvmlProbe()
        found = bool(probe.snapshot().devices)
        probe.close()
        return found
    except Exception:
        return False


def _start_child(label: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ready" in line and not ready.is_set():
                ready.set()
            sys.stdout.write(f"[{label}] {line}")
            sys.stdout.flush()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(READY_TIMEOUT_S) or proc.poll() is not None:
        raise RuntimeError(f"{label} did not start (exit code {proc.poll()})")
    return proc


def run_stack(config: Config, *, sim_gpus: str | None, name: str | None) -> int:
    try:
        private_dir(config.state_dir)
        up_lock = InstanceLock(config.state_dir / "up.lock", "gpulab up", config.state_dir).acquire()
    except (AlreadyRunning, LockUnavailable) as exc:
        print(refusal(exc), file=sys.stderr, flush=True)
        return 1
    try:
        with scheduler_lock(config.state_dir):
            pass  # free: the scheduler we start takes it (it refuses, too, if one beats it to it)
    except (AlreadyRunning, LockUnavailable) as exc:
        print(refusal(exc), file=sys.stderr, flush=True)
        up_lock.release()
        return 1
    try:
        return _run_stack(config, sim_gpus=sim_gpus, name=name)
    finally:
        up_lock.release()


def _run_stack(config: Config, *, sim_gpus: str | None, name: str | None) -> int:
    url = config.effective_redis_url
    redis_server: RedisServer | None = None
    children: list[subprocess.Popen[str]] = []
    stop = threading.Event()
    stops = StopSignals(stop)  # SIGINT, SIGTERM: its handler takes no lock (jobs/daemons.py)
    try:
        if not reachable(url):
            if not is_local(url):
                print(f"gpulab: Redis at {url} is not reachable and is not local; start it first", file=sys.stderr)
                return 1
            unix_socket = Path(url.removeprefix("unix://")) if url.startswith("unix://") else None
            port = 0 if unix_socket else int(url.rsplit(":", 1)[1].split("/")[0])
            password_file = embedded_password(config.state_dir)
            config = replace(config, redis_password_file=str(password_file))
            redis_server = RedisServer(
                config.state_dir / "redis", unix_socket=unix_socket, port=port, password=config.redis_password()
            )
            redis_server.start()
            print(f"gpulab: started redis-server ({redis_server.url}, AOF everysec, noeviction)", flush=True)
        config = replace(config, redis_url=url)
        env = dict(os.environ, GPULAB_REDIS_URL=url, GPULAB_STATE_DIR=str(config.state_dir))
        if config.redis_password_file:  # the daemons read the password from the file, not argv
            env["GPULAB_REDIS_PASSWORD_FILE"] = config.redis_password_file
        elif (config.state_dir / "redis.password").exists() and is_local(url):
            env["GPULAB_REDIS_PASSWORD_FILE"] = str(config.state_dir / "redis.password")
        if sim_gpus is None and not config.worker.simulate_gpus and not _nvml_has_gpus():
            sim_gpus = "2x24GiB"
            print("gpulab: no NVIDIA GPU found; simulating 2x24GiB", flush=True)
        cli = [sys.executable, "-m", "cli"]
        children.append(_start_child("scheduler", [*cli, "scheduler"], env))
        worker_args = (
            cli + ["worker"] + (["--sim-gpus", sim_gpus] if sim_gpus else []) + (["--name", name] if name else [])
        )
        children.append(_start_child("worker", worker_args, env))
        print(
            f"gpulab: up. Socket {config.socket_path}. Try: gpulab submit -- echo hi; gpulab queue. Ctrl-C stops.",
            flush=True,
        )
        while not stop.is_set():
            if any(c.poll() is not None for c in children):
                print("gpulab: a daemon exited; stopping the stack", file=sys.stderr)
                return 1
            stops.wait(0.5)
        return 0
    except (RedisServerError, RuntimeError) as exc:
        print(f"gpulab: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
        if redis_server is not None:
            redis_server.stop()
