"""Settings: sources and precedence, validation, masking, and that every one is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from tollgate.config import ConfigError, load_settings, mask_dsn, setting_docs

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
        ({"TOLLGATE_WRITER_BATCH_SIZE": "0"}, "'writer_batch_size' must be at least 1"),
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
    assert mask_dsn("postgresql://db/x") == "postgresql://db/x"


def test_settings_are_documented() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    missing = [
        name
        for name, env, _default, _help in setting_docs()
        if f"`{name}`" not in docs or f"`{env}`" not in docs
    ]
    assert missing == [], f"settings missing from docs/configuration.md: {missing}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOLLGATE_ENVOY_LISTEN_PORT": "0"}, "'envoy_listen_port' must be at least 1, got 0"),
        ({"TOLLGATE_ENVOY_LISTEN_PORT": "65536"}, "'envoy_listen_port' must be at most 65535"),
        ({"TOLLGATE_ENVOY_ADMIN_PORT": "-1"}, "'envoy_admin_port' must be at least 0"),
        ({"TOLLGATE_UPSTREAM_TIMEOUT_S": "-5"}, "'upstream_timeout_s' must be at least 0"),
        ({"TOLLGATE_MAX_BODY_BYTES": str(2**31)}, "'max_body_bytes' must be at most"),
        ({"TOLLGATE_EXTPROC_MESSAGE_TIMEOUT_MS": "0"}, "'extproc_message_timeout_ms'"),
        ({"TOLLGATE_WRITER_CONCURRENCY": "1000"}, "'writer_concurrency' must be at most 64"),
        ({"TOLLGATE_JOURNAL_MAX_BYTES": "10"}, "'journal_max_bytes' must be at least 1024"),
        ({"TOLLGATE_KEY_CACHE_REFRESH_S": "0"}, "'key_cache_refresh_s' must be at least 1"),
        ({"TOLLGATE_JOURNAL_FULL_POLICY": "drop"}, "'journal_full_policy': 'drop' not allowed"),
        ({"TOLLGATE_SPOOFED_USER_ID": "warn"}, "'spoofed_user_id': 'warn' not allowed"),
        ({"TOLLGATE_IDENTITY_SOURCES": "jwt,cookie"}, "'identity_sources': 'cookie' not allowed"),
        ({"TOLLGATE_METRICS_ADDRESS": "unix:/tmp/m.sock"}, "metrics_address"),
    ],
)
def test_declared_constraints_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_constraints_are_declared_with_the_setting_and_shown_in_its_help() -> None:
    helps = {name: help_text for name, _env, _default, help_text in setting_docs()}
    assert helps["envoy_listen_port"].endswith("Range: 1 to 65,535.")
    assert "Allowed: `reject`, `allow`." in helps["journal_full_policy"]
    # Boundaries are allowed; log_level ignores case as it always did.
    s = load_settings(environ={"TOLLGATE_ENVOY_ADMIN_PORT": "0", "TOLLGATE_LOG_LEVEL": "INFO"})
    assert (s.envoy_admin_port, s.log_level) == (0, "INFO")


@pytest.mark.parametrize(
    "uri", ["http://id.example.com/jwks", "ftp://id.example.com/jwks", "https:///jwks"]
)
def test_jwks_uri_must_be_https(uri: str) -> None:
    env = {"TOLLGATE_JWT_ISSUER": "https://id.example.com", "TOLLGATE_JWT_JWKS_URI": uri}
    with pytest.raises(ConfigError, match="jwt_jwks_uri must be an https:// URL"):
        load_settings(environ=env)


@pytest.mark.parametrize("address", ["0.0.0.0:9002", "10.1.2.3:9002", "tollgate:9002", "[::]:1"])
def test_non_loopback_grpc_address_needs_mutual_tls(address: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"TOLLGATE_GRPC_ADDRESS": address})
    message = str(refused.value)
    assert address in message
    for name in ("grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tls_client_ca_file"):
        assert name in message
    tls = {
        "TOLLGATE_GRPC_TLS_CERT_FILE": "/c.pem",
        "TOLLGATE_GRPC_TLS_KEY_FILE": "/k.pem",
        "TOLLGATE_GRPC_TLS_CLIENT_CA_FILE": "/ca.pem",
    }
    assert load_settings(environ={"TOLLGATE_GRPC_ADDRESS": address, **tls}).grpc_address == address


@pytest.mark.parametrize("address", ["127.0.0.1:9002", "[::1]:9002", "localhost:1", "unix:/x"])
def test_loopback_and_unix_grpc_addresses_need_no_tls(address: str) -> None:
    assert load_settings(environ={"TOLLGATE_GRPC_ADDRESS": address}).grpc_address == address


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOLLGATE_GRPC_TLS_CERT_FILE": "/c.pem"}, "go together"),
        ({"TOLLGATE_GRPC_TLS_CLIENT_CA_FILE": "/ca.pem"}, "grpc_tls_cert_file"),
        ({"TOLLGATE_ENVOY_GRPC_CLIENT_CERT_FILE": "/c.pem"}, "envoy_grpc_client_key_file"),
        ({"TOLLGATE_USAGE_SERVICE_ADDRESS": "127.0.0.1:1"}, "no token"),
        (
            {"TOLLGATE_USAGE_SERVICE_ADDRESS": "0.0.0.0:1", "TOLLGATE_USAGE_SERVICE_TOKEN": "t"},
            "needs TLS",
        ),
        (
            {
                "TOLLGATE_USAGE_SERVICE_ADDRESS": "127.0.0.1:9002",
                "TOLLGATE_USAGE_SERVICE_TOKEN": "t",
            },
            "must differ from grpc_address",
        ),
    ],
)
def test_grpc_security_rules(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)
