"""Configuration: config.toml (at $GPULAB_CONFIG, else /etc/gpulab/config.toml, else defaults),
then GPULAB_REDIS_URL and GPULAB_STATE_DIR on top, so two stacks can share one machine.

Every setting is documented in the repository's config.toml.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from jobs.sizes import format_size, parse_size

SYSTEM_CONFIG = Path("/etc/gpulab/config.toml")


class ConfigError(ValueError):
    """A config file or setting is wrong; the message names the file and key."""


@dataclass(frozen=True)
class SchedulerConfig:
    socket: str = ""  # "" -> <state_dir>/gpulab.sock
    housekeeping_interval_s: float = 1.0
    headroom_bytes: int = 256 * 2**20
    spike_buffer_bytes: int = 512 * 2**20
    idle_gpu_max_used_bytes: int = 512 * 2**20
    assign_timeout_s: float = 30.0
    max_pending_per_user: int = 10_000
    # Bytes of job specs (argv + captured environment, as stored) one submit may add, and one
    # user's waiting jobs may hold: the count caps alone let a few `--array` submits of a big
    # environment grow Redis by gigabytes. 0 = no cap.
    max_submit_size_bytes: int = 32 * 2**20
    max_stored_per_user_bytes: int = 256 * 2**20
    max_requeues: int = 5
    metrics_port: int = 0  # Prometheus /metrics + status page on this TCP port; 0 = off
    metrics_bind: str = "127.0.0.1"
    # The API and the status page serve each connection on its own thread: these bound the
    # threads, so one user's many (or slow) clients cannot lock everyone else out.
    max_api_connections: int = 256
    max_api_connections_per_user: int = 32
    api_request_timeout_s: float = 10.0  # to send a whole request (slowloris clients are dropped)
    # Start estimates for every waiting job (scheduler/forecast.py): recomputed at most this
    # often (0 = off), with at most this many simulated placements, and this run time for
    # jobs with neither a time limit nor a learned duration (0 = unknown).
    eta_interval_s: float = 30.0
    max_eta_steps: int = 200
    eta_default_runtime_s: float = 3600.0
    # Several schedulers may share one Redis: each serves the API, one (the leader, holding
    # a Redis lease of this length, renewed every third of it) runs the scheduling loop. A
    # leader killed with -9 is replaced within about this long plus half a second.
    leader_lease_s: float = 3.0


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: job order, fair share, reservations and per-user caps (README "Scheduling policy").

    priority = weight_priority * --priority
             + weight_fairshare * 2^(-(usage_user / usage_all) * n_users)
             + weight_age * min(1, waited / max_age)
    Usage is GPU memory x seconds (request or peak, whole GPU = its total), decayed with
    `fairshare_half_life_s`. Caps of 0 mean "no cap".
    """

    weight_priority: float = 1.0
    weight_fairshare: float = 1000.0
    weight_age: float = 1000.0
    max_age_s: float = 86400.0
    fairshare_half_life_s: float = 7 * 86400.0
    reserve_after_s: float = 300.0
    max_reservations: int = 1
    max_gpus_per_user: int = 0
    max_mem_per_user_bytes: int = 0
    max_running_per_user: int = 0
    max_array_size: int = 1000
    admin_users: tuple[str, ...] = ("root",)
    # Preemption by checkpoint (scheduler/policy/preemption.py): a waiting job that would not
    # start within preempt_after_s (0 = preemption off) may stop preemptible jobs whose claim
    # (weight_priority * --priority + weight_fairshare * F(user)) is lower than its own by more
    # than preempt_margin and that have run at least preempt_min_run_s.
    preempt_after_s: float = 0.0
    preempt_min_run_s: float = 600.0
    preempt_margin: float = 100.0
    # Idle GPUs: a job holding GPU memory at <= idle_max_util_percent utilisation for
    # idle_after_s (0 = off) is flagged; "notify" also writes an event its owner's
    # notifications follow, "stop" stops it (SIGTERM first: built-in-loop jobs checkpoint).
    idle_after_s: float = 1800.0
    idle_action: str = "flag"
    idle_max_util_percent: float = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    name: str = ""  # "" -> host name
    simulate_gpus: tuple[str, ...] = ()
    heartbeat_interval_s: float = 1.0
    lease_ttl_s: float = 10.0
    kill_grace_s: float = 30.0  # training jobs checkpoint on SIGTERM before exiting
    # Job output shipped into Redis for `gpulab logs` from any host (worker/logship.py).
    log_ship_interval_s: float = 0.1
    log_rate_bytes: int = 256 * 2**10  # per job per second, after a burst of log_burst
    log_burst_bytes: int = 2**20
    log_node_rate_bytes: int = 8 * 2**20  # all of one worker's jobs together, per second
    log_redis_cap_bytes: int = 2**20  # kept per job: the head and the newest output
    log_head_bytes: int = 64 * 2**10
    log_retention_s: float = 7 * 86400.0  # after the last byte shipped


@dataclass(frozen=True)
class NotifyConfig:
    """[notify]: webhooks and mail when jobs end, fail, are held or start late (README "Notifications")."""

    enabled: bool = True  # the scheduler runs the notifier thread
    smtp_host: str = ""  # "" -> no mail: --mail is refused at submit
    smtp_port: int = 25
    smtp_from: str = "gpulab@localhost"
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password_file: str = ""
    smtp_timeout_s: float = 10.0
    # Networks webhooks may reach besides public addresses (CIDRs, e.g. "10.1.0.0/16"); loopback,
    # private, link-local (cloud metadata) and other special addresses are refused otherwise.
    allow_networks: tuple[str, ...] = ()
    webhook_timeout_s: float = 5.0  # to connect, and for the whole answer's headers after sending
    started_late_after_s: float = 3600.0
    max_attempts: int = 8
    retry_base_s: float = 10.0  # the first retry; doubled every attempt
    retry_max_s: float = 900.0  # ... up to this
    max_queued_per_user: int = 20000  # deliveries waiting per user; past it new ones are dropped
    max_batch: int = 100  # events per webhook POST or mail
    max_per_minute: int = 12  # webhook POSTs (and, separately, mails) per user per minute
    max_parallel: int = 8  # deliveries in flight at once (threads)


@dataclass(frozen=True)
class MemoryConfig:
    """[memory]: learned requests (`--mem auto`), pre-run estimates, and enforcement of
    requests on shared GPUs (README "Memory: learned requests, estimates, enforcement")."""

    auto_quantile: float = 0.95  # learned request = this quantile of the recent peaks ...
    auto_margin: float = 0.05  # ... plus this fraction (BENCHMARKS.md, "Learned requests")
    auto_min_runs: int = 3  # runs a profile needs before it is used (and the default without --mem)
    auto_min_request_bytes: int = 256 * 2**20
    outlier_factor: float = 4.0  # a peak over this x the median of the others is left out; 0 = never
    profile_window: int = 20  # recent runs kept per profile
    max_profiles_per_user: int = 1000
    profile_ttl_days: float = 180.0
    # Options (with their values) that do not change a job's memory: two runs that differ only
    # in them share a profile. Every other argument counts (a changed batch size is a new profile).
    profile_ignore_args: tuple[str, ...] = (
        "--seed", "--epochs", "--lr", "--learning-rate", "--out", "--output", "--output-dir", "--log-dir",
        "--logdir", "--run-name", "--name", "--resume", "--checkpoint", "--wandb-project", "--wandb-name",
    )  # fmt: skip
    estimate: bool = True  # `gpulab train` without --mem and without a profile: estimate one step first
    estimate_timeout_s: float = 120.0
    cuda_context_bytes: int = 640 * 2**20  # added to the traced peak (what the allocator never sees)
    enforce: str = "stop"  # a job over its request while a co-tenant is at risk: warn | stop | never
    enforce_grace_s: float = 30.0  # between the warning and the stop


ENFORCE_POLICIES = ("warn", "stop", "never")


@dataclass(frozen=True)
class Config:
    redis_url: str = ""  # "" -> embedded redis on a unix socket in the state dir
    redis_password_file: str = ""  # a file holding the Redis password (never on a command line)
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    source: str = "built-in defaults"

    @property
    def socket_path(self) -> Path:
        return Path(self.scheduler.socket) if self.scheduler.socket else self.state_dir / "gpulab.sock"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or f"unix://{self.state_dir / 'redis.sock'}"

    def redis_password(self) -> str | None:
        """$GPULAB_REDIS_PASSWORD, else the contents of [redis] password_file, else none."""
        if os.environ.get("GPULAB_REDIS_PASSWORD"):
            return os.environ["GPULAB_REDIS_PASSWORD"]
        if not self.redis_password_file:
            return None
        try:
            return Path(self.redis_password_file).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"[redis] password_file: cannot read {self.redis_password_file}: {exc.strerror}"
            ) from None

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def sim_dir(self) -> Path:
        return self.state_dir / "sim"

    @property
    def checkpoint_root(self) -> Path:
        return self.state_dir / "checkpoints"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/gpulab")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "gpulab"


_SIZE_KEYS = {
    "headroom", "spike_buffer", "idle_gpu_max_used", "max_mem_per_user", "max_submit_size", "max_stored_per_user",
    "log_rate", "log_burst", "log_node_rate", "log_redis_cap", "log_head",
    "auto_min_request", "cuda_context",
}  # fmt: skip
_TUPLE_KEYS = {"simulate_gpus", "admin_users", "allow_networks", "profile_ignore_args"}
_FLOAT_KEYS = {
    "auto_quantile", "auto_margin", "outlier_factor", "profile_ttl_days", "preempt_margin", "idle_max_util_percent",
}  # fmt: skip
_CHOICES = {"idle_action": ("flag", "notify", "stop")}
# Durations: finite, 0 to MAX_SECONDS (31 years: more overflows a socket timeout or a PX),
# and these more than 0 (a lease, an interval or a timeout of 0 is an error in Redis, a busy
# loop or a division by zero).
MAX_SECONDS = 1e9
_POSITIVE_SECONDS = {
    "housekeeping_interval_s", "assign_timeout_s", "api_request_timeout_s",
    "eta_default_runtime_s", "heartbeat_interval_s", "lease_ttl_s",
    "log_retention_s", "smtp_timeout_s", "webhook_timeout_s", "retry_base_s", "retry_max_s",
    "estimate_timeout_s",
}  # fmt: skip


def _section(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{key}_bytes" if key in _SIZE_KEYS else key
        if name not in known:
            raise ConfigError(f"{where}: unknown setting '{key}'")
        try:
            if key in _SIZE_KEYS:
                value = parse_size(str(value), allow_zero=True)
            elif name in _TUPLE_KEYS:
                if not isinstance(value, list):
                    raise ValueError("must be a list of strings")
                value = tuple(str(v) for v in value)
            elif name in _FLOAT_KEYS:
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
                    raise ValueError("must be a number, 0 or more")
                value = float(value)
            elif name.endswith("_s") or name.startswith("weight_"):
                if isinstance(value, bool):
                    raise ValueError("must be a number")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError("must be a finite number")
                if name == "leader_lease_s" and not 0.5 <= value <= 3600:
                    raise ValueError("must be between 0.5 and 3600 seconds")
                if name.endswith("_s") and not 0 <= value <= MAX_SECONDS:
                    raise ValueError(f"must be between 0 and {MAX_SECONDS:.0f} seconds")
                if name in _POSITIVE_SECONDS and value <= 0:
                    raise ValueError("must be more than 0 seconds")
            elif name == "enforce" and value not in ENFORCE_POLICIES:
                raise ValueError(f"must be one of {', '.join(ENFORCE_POLICIES)}")
            elif name in ("auto_min_runs", "profile_window") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError("must be a whole number, 1 or more")
            elif name in _CHOICES and value not in _CHOICES[name]:
                raise ValueError(f"must be one of {', '.join(_CHOICES[name])}")
            elif (name.startswith("max_") or name.endswith("_port")) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError("must be a whole number, 0 or more")
            elif isinstance(getattr(cls, name, None), bool) and not isinstance(value, bool):
                raise ValueError("must be true or false")
            elif isinstance(getattr(cls, name, None), str) and not isinstance(value, str):
                raise ValueError("must be a string")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: '{key}': {exc}") from None
        values[name] = value
    return cls(**values)


def load_config(path: Path | None = None) -> Config:
    """Read the config file (if any) and apply the environment overrides."""
    if path is None and os.environ.get("GPULAB_CONFIG"):
        path = Path(os.environ["GPULAB_CONFIG"])
    if path is None and SYSTEM_CONFIG.exists():
        path = SYSTEM_CONFIG
    config = Config()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        config = _from_toml(data, str(path))
    if os.environ.get("GPULAB_REDIS_URL"):
        config = replace(config, redis_url=os.environ["GPULAB_REDIS_URL"])
    if os.environ.get("GPULAB_STATE_DIR"):
        config = replace(config, state_dir=Path(os.environ["GPULAB_STATE_DIR"]))
    if os.environ.get("GPULAB_REDIS_PASSWORD_FILE"):
        config = replace(config, redis_password_file=os.environ["GPULAB_REDIS_PASSWORD_FILE"])
    _check_paths(config, f"{path}: " if path is not None else "")
    return config


MAX_SOCKET_PATH = 107  # bytes: a Unix socket address (sun_path) holds 108, with its NUL


def _check_paths(config: Config, where: str) -> None:  # where: "FILE: " or ""
    """Paths every process must read alike: a relative one is relative to each process's
    working directory (the daemon's, '/' under systemd, and each user's shell's), so the CLI
    would look for the socket elsewhere; and a socket path a Unix socket cannot bind."""
    if not config.state_dir.is_absolute():
        origin = "GPULAB_STATE_DIR" if os.environ.get("GPULAB_STATE_DIR") else f"{where}[paths] 'state_dir'"
        raise ConfigError(f"{origin}: {str(config.state_dir)!r} must be an absolute path")
    if config.scheduler.socket and not Path(config.scheduler.socket).is_absolute():
        raise ConfigError(f"{where}[scheduler] 'socket': {config.scheduler.socket!r} must be an absolute path")
    length = len(os.fsencode(config.socket_path))
    if length > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{where}the API socket {config.socket_path} is {length} bytes long; a Unix socket's path holds at "
            f"most {MAX_SOCKET_PATH}: set [scheduler] socket (or the state directory) to a shorter path"
        )


def _from_toml(data: dict[str, Any], where: str) -> Config:
    unknown = set(data) - {"redis", "paths", "scheduler", "worker", "policy", "notify", "memory"}
    if unknown:
        raise ConfigError(f"{where}: unknown section [{sorted(unknown)[0]}]")
    redis_url = str(data.get("redis", {}).get("url", ""))
    password_file = str(data.get("redis", {}).get("password_file", ""))
    state_dir = str(data.get("paths", {}).get("state_dir", ""))
    return Config(
        redis_url=redis_url,
        redis_password_file=str(Path(password_file).expanduser()) if password_file else "",
        state_dir=Path(state_dir).expanduser() if state_dir else default_state_dir(),
        scheduler=_section(SchedulerConfig, data.get("scheduler", {}), f"{where} [scheduler]"),
        worker=_worker(data.get("worker", {}), f"{where} [worker]"),
        policy=_section(PolicyConfig, data.get("policy", {}), f"{where} [policy]"),
        notify=_notify_section(data.get("notify", {}), f"{where} [notify]"),
        memory=_memory(data.get("memory", {}), f"{where} [memory]"),
        source=where,
    )


def _worker(table: dict[str, Any], where: str) -> WorkerConfig:
    worker: WorkerConfig = _section(WorkerConfig, table, where)
    if worker.heartbeat_interval_s * 2 > worker.lease_ttl_s:
        # Each heartbeat renews the leases; a job's shim stops it at 0.75 of the lease
        # without one, so a slower heartbeat kills every job a few seconds after its start.
        raise ConfigError(
            f"{where}: 'heartbeat_interval_s' ({worker.heartbeat_interval_s:g}s) must be at most half of "
            f"'lease_ttl_s' ({worker.lease_ttl_s:g}s): jobs stop themselves at 0.75 of the lease without a renewal"
        )
    if worker.log_head_bytes > worker.log_redis_cap_bytes:
        # The head is never trimmed: a head past the cap is what Redis keeps of every job.
        raise ConfigError(
            f"{where}: 'log_head' ({format_size(worker.log_head_bytes)}) must be at most "
            f"'log_redis_cap' ({format_size(worker.log_redis_cap_bytes)}): the head is kept whole, past the cap"
        )
    return worker


def _notify_section(table: dict[str, Any], where: str) -> NotifyConfig:
    notify: NotifyConfig = _section(NotifyConfig, table, where)
    for network in notify.allow_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: 'allow_networks': {network!r} is not a network like 10.0.0.0/8") from None
    return notify


def _memory(table: dict[str, Any], where: str) -> MemoryConfig:
    memory: MemoryConfig = _section(MemoryConfig, table, where)
    if not 0 < memory.auto_quantile <= 1:
        raise ConfigError(f"{where}: 'auto_quantile' must be more than 0 and at most 1")
    if not isinstance(memory.estimate, bool):
        raise ConfigError(f"{where}: 'estimate' must be true or false")
    return memory
