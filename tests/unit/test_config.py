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
