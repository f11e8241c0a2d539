from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_repository_config_toml_documents_exactly_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPULAB_REDIS_URL", raising=False)
    monkeypatch.delenv("GPULAB_STATE_DIR", raising=False)
    from_file = load_config(ROOT / "config.toml")
    defaults = Config()
    assert from_file.scheduler == defaults.scheduler
    assert from_file.worker == defaults.worker
    assert from_file.policy == defaults.policy
    assert (from_file.redis_url, from_file.state_dir) == (defaults.redis_url, defaults.state_dir)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[redis]\nurl = "redis://elsewhere:1/0"\n[paths]\nstate_dir = "/srv/a"\n')
    monkeypatch.setenv("GPULAB_REDIS_URL", "redis://127.0.0.1:7/0")
    monkeypatch.setenv("GPULAB_STATE_DIR", str(tmp_path))
    config = load_config(path)
    assert config.effective_redis_url == "redis://127.0.0.1:7/0"
    assert config.socket_path == tmp_path / "gpulab.sock"


def test_embedded_default_is_a_unix_socket_in_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPULAB_REDIS_URL", raising=False)
    monkeypatch.delenv("GPULAB_CONFIG", raising=False)
    monkeypatch.setenv("GPULAB_STATE_DIR", str(tmp_path))
    assert load_config().effective_redis_url == f"unix://{tmp_path}/redis.sock"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[scheduler]\nheadroom = 'lots'\n", "headroom"),
        ("[scheduler]\nno_such_thing = 1\n", "no_such_thing"),
        ("[nonsense]\n", "nonsense"),
        ("[worker\n", "cannot read"),
    ],
)
def test_bad_config_names_the_setting(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


@pytest.mark.parametrize(
    "text",
    [
        "[worker]\nlease_ttl_s = 0\n",  # Redis refuses a PX of 0: a traceback at the worker's first lease
        "[worker]\nlease_ttl_s = -1\n",
        "[worker]\nlease_ttl_s = inf\n",  # OverflowError in the socket timeout derived from it
        "[worker]\nheartbeat_interval_s = nan\n",  # a worker that said ready and never beat
        "[worker]\nlog_retention_s = inf\n",  # every log shipping tick failed
        "[worker]\nlog_retention_s = 0\n",  # every job's output deleted as it is shipped
        "[scheduler]\nhousekeeping_interval_s = -2\n",
        "[scheduler]\nassign_timeout_s = 1e300\n",
        "[worker]\nheartbeat_interval_s = 0\n",  # a heartbeat loop that spins
        "[policy]\nweight_age = nan\n",
        "[worker]\nkill_grace_s = true\n",
    ],
)
def test_durations_and_weights_must_be_finite_numbers_in_range(tmp_path: Path, text: str) -> None:
    """A duration that is 0 (where 0 makes no sense), negative, NaN or infinite, or a weight
    that is not a finite number, is refused with one line naming it, not found later as a
    daemon's traceback (or a daemon that silently does nothing)."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    name = text.split("\n")[1].split(" =")[0]
    with pytest.raises(ConfigError, match=name):
        load_config(path)


def test_a_heartbeat_slower_than_half_the_lease_is_refused(tmp_path: Path) -> None:
    """Each heartbeat renews the leases, and a job's shim stops it at 0.75 of the lease
    without a renewal: a slower heartbeat would kill every job seconds after it started."""
    path = tmp_path / "bad.toml"
    path.write_text("[worker]\nheartbeat_interval_s = 8\n")  # the lease stays 10 s
    with pytest.raises(ConfigError, match=r"heartbeat_interval_s.*lease_ttl_s"):
        load_config(path)
    path.write_text("[worker]\nheartbeat_interval_s = 5\nlease_ttl_s = 10\n")
    assert load_config(path).worker.heartbeat_interval_s == 5


def test_a_log_head_past_the_redis_cap_is_refused(tmp_path: Path) -> None:
    """The head of a job's output is never trimmed in Redis: a head of 10 GiB under a cap of
    1 MiB let every job keep 10 GiB there (and a noeviction Redis refuse every write when full)."""
    path = tmp_path / "bad.toml"
    path.write_text('[worker]\nlog_head = "10GiB"\nlog_redis_cap = "1MiB"\n')
    with pytest.raises(ConfigError, match="'log_head'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('[paths]\nstate_dir = "gpulab-state"\n', {}, "state_dir"),  # relative: each process its own cwd's
        ('[scheduler]\nsocket = "run/gpulab.sock"\n', {}, "socket"),
        ("", {"GPULAB_STATE_DIR": "state"}, "GPULAB_STATE_DIR"),
        ("", {"GPULAB_STATE_DIR": "/tmp/" + "x" * 110}, "socket"),  # past AF_UNIX's 108 bytes
        ('[scheduler]\nsocket = "/run/' + "y" * 120 + '.sock"\n', {}, "socket"),
    ],
)
def test_paths_that_daemons_and_clients_would_read_differently_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], needle: str
) -> None:
    """A relative state directory or socket is relative to each process's working directory
    (the daemon's, under systemd '/', and every user's shell's): the CLI never found the
    scheduler. A socket path longer than a Unix socket address allows ended the scheduler in
    an 'AF_UNIX path too long' traceback. Each is one line naming the setting."""
    monkeypatch.delenv("GPULAB_STATE_DIR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)
