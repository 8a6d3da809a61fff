"""Settings: sources and precedence, validation, masking, and that every one is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from tollgate.config import ConfigError, load_settings, mask_url, setting_docs

REPO = Path(__file__).resolve().parent.parent.parent


def test_defaults_are_valid() -> None:
    s = load_settings(environ={})
    assert s.envoy_listen_port == 10000
    assert s.database_url == ""


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    conf = tmp_path / "tollgate.toml"
    conf.write_text('envoy_listen_port = 11000\nlog_level = "debug"\nwriter_batch_size = 7\n')
    env = {"TOLLGATE_ENVOY_LISTEN_PORT": "12000"}
    s = load_settings(conf, environ=env, writer_batch_size=9)
    assert (s.envoy_listen_port, s.log_level, s.writer_batch_size) == (12000, "debug", 9)


def test_config_file_from_environment(tmp_path: Path) -> None:
    conf = tmp_path / "t.toml"
    conf.write_text('upstream_url = "http://127.0.0.1:8090"\n')
    assert (
        load_settings(environ={"TOLLGATE_CONFIG": str(conf)}).upstream_url
        == "http://127.0.0.1:8090"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOLLGATE_ENVOY_LISTEN_PORT": "ten"}, "expected int"),
        ({"TOLLGATE_UPSTREAM_URL": "ftp://x"}, "upstream_url"),
        ({"TOLLGATE_GRPC_ADDRESS": "nowhere"}, "grpc_address"),
        ({"TOLLGATE_WRITER_BATCH_SIZE": "0"}, "positive"),
        ({"TOLLGATE_LOG_LEVEL": "loud"}, "log_level"),
    ],
)
def test_bad_values_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "t.toml"
    conf.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(conf, environ={})


def test_password_is_masked_in_repr() -> None:
    s = load_settings(environ={"TOLLGATE_DATABASE_URL": "postgresql://app:s3cret@db:5432/ledger"})
    assert "s3cret" not in repr(s)
    assert "postgresql://app:***@db:5432/ledger" in repr(s)
    assert mask_url("postgresql://db/x") == "postgresql://db/x"


def test_settings_are_documented() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    missing = [
        name
        for name, env, _default, _help in setting_docs()
        if f"`{name}`" not in docs or f"`{env}`" not in docs
    ]
    assert missing == [], f"settings missing from docs/configuration.md: {missing}"
