"""Wiring and lifecycle: database, ledger writer, gRPC servers, Envoy; graceful drain on stop.

Start order: Postgres (embedded unless configured) → migrations → pool → ledger writer →
key cache → Envoy → gRPC (ext_proc and health; UsageService on its own listener when on) →
metrics. Each part registers its own teardown on an :class:`~contextlib.AsyncExitStack` as
soon as it runs, so the stop is the reverse of what actually started: Envoy stops taking
traffic, health goes NOT_SERVING, the gRPC servers stop with a grace period, the writer
drains its queue, the pool closes, Postgres shuts down. A teardown that fails is logged and
the next one runs; stopping twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from psycopg_pool import AsyncConnectionPool

from tollgate.alerts import AlertSink
from tollgate.config import ConfigError, Settings, mask_dsn
from tollgate.envoyadmin import start_drain, wait_until_idle
from tollgate.extproc.processor import PolicyConfig, ProcessorContext, RequestProcessor
from tollgate.extproc.server import ExternalProcessorServicer
from tollgate.ledger.journal import Journal
from tollgate.ledger.limits import DEFAULT_USER_BUDGET_ID, LimitError, sync_default_budget
from tollgate.ledger.migrate import apply_migrations
from tollgate.ledger.service import BearerTokenInterceptor, UsageServicer
from tollgate.ledger.writer import BatchObserver, LedgerWriter
from tollgate.localstack import (
    DashboardProcess,
    EmbeddedPostgres,
    EnvoyProcess,
    FakeProviderProcess,
    free_port,
    running_postgres_url,
)
from tollgate.metrics import start_http_endpoint
from tollgate.observe import RequestLog, UsageCounters
from tollgate.policy.keys import KeyCache
from tollgate.policy.limits import LimitBook
from tollgate.pricing import PriceBook, parse_overrides
from tollgate.routing.allowlist import BaseUriAllowList, InvalidBaseUri
from tollgate.routing.providers import load_providers
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2_grpc
from tollgate.web.auth import admin_token

__all__ = [
    "Stack",
    "StackOptions",
    "build_router",
    "grpc_server_credentials",
    "ledger_database",
    "run_migrations",
    "stop_signal",
    "usage_service_token",
]

log = logging.getLogger(__name__)


def _render_envoy_yaml(settings: Settings, target: str) -> str:
    """Envoy's bootstrap for ``target`` (run in a child process: see ``_start_envoy``)."""
    from tollgate.envoyconf import render_yaml

    return render_yaml(settings, target)


EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# Envoy adds framing and headers around a body; leave room above the body limit.
_GRPC_OVERHEAD_BYTES = 1024 * 1024


@contextlib.asynccontextmanager
async def ledger_database(settings: Settings) -> AsyncIterator[str]:
    """The ledger's URL: the configured one, a running embedded server, or one started now.

    A server started here is stopped when the context ends.
    """
    if settings.database_url:
        yield settings.database_url
        return
    data_dir = settings.resolved_state_dir() / "pgdata"
    url = running_postgres_url(data_dir)
    if url is not None:
        yield url
        return
    server = EmbeddedPostgres(data_dir, log_path=settings.resolved_state_dir() / "postgres.log")
    try:
        yield await asyncio.to_thread(server.start)
    finally:
        await asyncio.to_thread(server.stop)


async def run_migrations(url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        applied = await apply_migrations(conn)
    return [f"{m.version:03d}_{m.name}" for m in applied]


def build_router(settings: Settings, environ: Mapping[str, str] | None = None) -> Router:
    """The router from the provider definitions (keys read from ``environ``, default the
    process environment), the allow-list and the routing settings."""
    try:
        allow_list = BaseUriAllowList(settings.base_uri_allow_list)
    except InvalidBaseUri as exc:
        raise ConfigError(f"base_uri_allow_list: {exc}") from None
    return Router(
        load_providers(settings, environ),
        settings.default_provider.lower(),
        allow_list,
        model_prefix_routing=settings.model_prefix_routing,
    )


def _concrete_address(address: str) -> str:
    """``address`` with port 0 replaced by a free port (Envoy must know the real one)."""
    if address.startswith("unix:") or not address.endswith(":0"):
        return address
    host = address.rpartition(":")[0]
    return f"{host}:{free_port(host.strip('[]'))}"


@dataclass
class StackOptions:
    run_envoy: bool = True
    fake_provider_port: int | None = None  # start the fake provider on this port
    run_dashboard: bool = False  # start `tollgate dashboard` as a child (up, demo)
    envoy_target: str = "local"


@dataclass
class _Running:
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
    writer: LedgerWriter | None = None
    extproc: ExternalProcessorServicer | None = None
    keys: KeyCache | None = None
    health: health_aio.HealthServicer | None = None
    grpc_server: grpc.aio.Server | None = None
    envoy: EnvoyProcess | None = None


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Mutual TLS for the ext_proc listener, or None (plaintext) when no certificate is set."""
    if not settings.grpc_tls_cert_file:
        return None
    key, cert = _read_pem(settings.grpc_tls_key_file), _read_pem(settings.grpc_tls_cert_file)
    client_ca = (
        _read_pem(settings.grpc_tls_client_ca_file) if settings.grpc_tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def alert_sink(settings: Settings) -> AlertSink:
    """The limit alert sink; with a webhook URL, its secret must be readable and non-empty."""
    if not settings.alert_webhook_url:
        return AlertSink()
    if not settings.alert_webhook_url.startswith(("https://", "http://")):
        raise ConfigError("alert_webhook_url must be an http:// or https:// URL")
    path = settings.alert_webhook_secret_file
    if not path:
        raise ConfigError("alert_webhook_url needs alert_webhook_secret_file (the HMAC secret)")
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"alert_webhook_secret_file: cannot read {path}: {exc.strerror}"
        ) from None
    if not secret:
        raise ConfigError("alert_webhook_secret_file is empty")
    return AlertSink(settings.alert_webhook_url, secret)


def usage_service_token(settings: Settings) -> str:
    """The token UsageService callers must send, from the setting or its file."""
    token = settings.usage_service_token
    if settings.usage_service_token_file:
        try:
            token = Path(settings.usage_service_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"usage_service_token_file: cannot read {settings.usage_service_token_file}: "
                f"{exc.strerror}"
            ) from None
    if not token:
        raise ConfigError("usage_service_token_file is empty: UsageService needs a token")
    return token


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``server`` to ``address``; a unix socket is created owner-only (0600)."""
    is_unix = address.startswith("unix:")
    # The umask covers the moment gRPC creates the socket file; chmod and the check make sure.
    old_umask = os.umask(0o177) if is_unix else None
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # what grpc raises when the bind fails
        port = 0
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    if is_unix and port == 0:
        raise OSError(f"cannot listen on {address}")
    if is_unix:
        path = Path(address.removeprefix("unix:"))
        path.chmod(0o600)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise OSError(f"cannot make {path} owner-only")
    elif port == 0:
        raise OSError(f"cannot listen on {address} (in use?)")
    return port


class Stack:
    """Tollgate and the processes around it, started and stopped in order."""

    def __init__(self, settings: Settings, options: StackOptions | None = None) -> None:
        self.settings = settings
        self.options = options or StackOptions()
        # Built first: a provider, allow-list or price mistake stops start-up before anything
        # runs.
        self.router = build_router(settings)
        self.prices = PriceBook(parse_overrides(settings.price_overrides))
        self._r = _Running()
        self._exits = contextlib.AsyncExitStack()
        self._grace_s = 3.0
        self.started = False
        self.draining = False
        self.usage_counters = UsageCounters()
        # The limits and their spend; the writer's observer tells it which rows committed.
        self.limits = LimitBook()
        self.alerts = alert_sink(settings)
        self.database_url = ""
        self.grpc_port = 0
        self.usage_port = 0
        self.dashboard_url = ""
        self.dashboard_token_file: Path | None = None

    @property
    def writer(self) -> LedgerWriter:
        assert self._r.writer is not None
        return self._r.writer

    @property
    def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        assert self._r.pool is not None
        return self._r.pool

    async def start(self) -> None:
        s = self.settings
        state = s.resolved_state_dir()
        state.mkdir(parents=True, exist_ok=True)
        try:
            # Read first: a missing certificate or token stops start-up before anything runs.
            credentials = grpc_server_credentials(s)
            token = usage_service_token(s) if s.usage_service_address else ""
            self.database_url = await self._exits.enter_async_context(ledger_database(s))
            log.info("ledger database: %s", mask_dsn(self.database_url))
            applied = await run_migrations(self.database_url)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            await self._start_pool()
            self._start_writer()
            await self._start_key_cache()
            await self._start_limits()
            # Children are forked before gRPC starts its threads (fork with them is unsafe).
            grpc_address = _concrete_address(s.grpc_address)
            if self.options.fake_provider_port is not None:
                await self._start_fake_provider(state, self.options.fake_provider_port)
            if self.options.run_dashboard and s.dashboard_address:
                await self._start_dashboard(state)
            envoy = None
            if self.options.run_envoy:
                envoy = await self._start_envoy(state, s.with_overrides(grpc_address=grpc_address))
            # Cloud access tokens (Vertex AI service accounts) before the first request.
            await asyncio.to_thread(self.router.start_credentials)
            self._exits.callback(self.router.stop_credentials)
            await self._start_grpc(grpc_address, credentials, envoy)
            if s.usage_service_address:
                await self._start_usage_service(s.usage_service_address, token)
            if s.metrics_address:
                self._teardown(
                    "the HTTP endpoint", await start_http_endpoint(s.metrics_address, self)
                )
        except BaseException:
            await self.stop()
            raise
        self.started = True

    def liveness(self) -> tuple[bool, str]:
        """Alive: the ledger writer runs (a dead writer would lose every record after)."""
        writer = self._r.writer
        if writer is not None and not writer.alive and not self.draining:
            return False, "ledger writer stopped"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Ready to serve; else why not. A Postgres outage alone does not make it unready."""
        if self.draining:
            return False, "draining"
        writer = self._r.writer
        if not self.started or writer is None or self._r.keys is None:
            return False, "starting"
        if not writer.accepting:
            return False, "journal full (journal_full_policy = reject)"
        if not writer.journal_writable:
            return False, "journal not writable"
        return True, "ready"

    async def drain(self) -> None:
        """The graceful part of a stop (SIGTERM): health goes NOT_SERVING at once; new
        streams are still served for ``shutdown_delay_s``; in-flight streams get up to
        ``shutdown_grace_s`` to finish. With its own Envoy (`tollgate up`), Envoy is drained
        first and stopped only once its requests are done. :meth:`stop` does the rest."""
        if self.draining:
            return
        self.draining = True
        s = self.settings
        r = self._r
        loop = asyncio.get_running_loop()
        if r.health is not None:
            await r.health.enter_graceful_shutdown()  # every service NOT_SERVING
        if r.envoy is not None:
            try:
                await asyncio.to_thread(start_drain, r.envoy.admin_url())
            except OSError as exc:
                log.warning("envoy did not take the drain request: %s", exc)
        log.info(
            "draining: new streams served for %ss, in-flight streams get up to %ss",
            s.shutdown_delay_s,
            s.shutdown_grace_s,
        )
        await asyncio.sleep(s.shutdown_delay_s)
        deadline = loop.time() + s.shutdown_grace_s
        if r.envoy is not None:
            # Envoy's requests (each an ext_proc stream here) end before Envoy stops.
            extproc = r.extproc
            await asyncio.to_thread(
                wait_until_idle,
                r.envoy.admin_url(),
                max(deadline - loop.time(), 0.0),
                0.05,
                lambda: bool(extproc is not None and extproc.active_streams),
            )
            await asyncio.to_thread(r.envoy.stop)
        if r.grpc_server is not None:
            # New streams are refused from here; in-flight ones get what is left of the grace.
            await r.grpc_server.stop(max(deadline - loop.time(), 0.0))
        active = r.extproc.active_streams if r.extproc is not None else 0
        if active:
            log.warning("%d ext_proc streams were still open after the grace period", active)

    def _teardown(self, what: str, step: Callable[[], Awaitable[None] | None]) -> None:
        """Register ``step`` to run at stop; if it fails, log that and go on with the rest."""

        async def run() -> None:
            try:
                result = step()
                if result is not None:
                    await result
            except Exception:
                log.exception("stopping %s failed; going on with the rest", what)

        self._exits.push_async_callback(run)

    async def _start_pool(self) -> None:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.database_url,
            min_size=1,
            # the writer's batches in flight, plus the key cache, usage service and partitions
            max_size=self.settings.writer_concurrency + 3,
            open=False,
            name="tollgate-ledger",
        )
        self._teardown("the database pool", pool.close)
        await pool.open()
        await pool.wait(timeout=30)
        self._r.pool = pool

    def _observers(self) -> tuple[list[BatchObserver], list[Callable[[], None]]]:
        """What each stored batch is shown to, and how to stop those that need it."""
        s = self.settings
        observers: list[BatchObserver] = [self.usage_counters, self.limits.observer]
        stops: list[Callable[[], None]] = []
        if s.log_requests:
            observers.append(RequestLog())
        if s.otel_endpoint:
            from tollgate.otel import OtelExporter

            try:
                exporter = OtelExporter(s.otel_endpoint, service_name=s.otel_service_name)
            except (ImportError, ValueError) as exc:
                raise ConfigError(f"otel_endpoint: {exc}") from None

            def to_otel(records: Sequence[Any], costs: Sequence[Any]) -> None:
                for record, cost in zip(records, costs, strict=True):
                    exporter.observe(record, cost, record.traceparent)

            observers.append(to_otel)
            stops.append(exporter.shutdown)
        return observers, stops

    @staticmethod
    async def _stop_observers(stops: list[Callable[[], None]]) -> None:
        for stop in stops:
            await asyncio.to_thread(stop)

    def _start_writer(self) -> None:
        s = self.settings
        observers, stop_observers = self._observers()
        journal = Journal(s.resolved_state_dir() / "journal")
        self._teardown("the journal", journal.close)
        writer = LedgerWriter(
            self.pool,
            queue_size=s.writer_queue_size,
            batch_size=s.writer_batch_size,
            flush_interval_s=s.writer_flush_interval_ms / 1000,
            prices=self.prices,
            journal=journal,
            journal_max_bytes=s.journal_max_bytes,
            reject_when_full=s.journal_full_policy == "reject",
            concurrency=s.writer_concurrency,
            observers=observers,
            on_alerts=self.alerts,
        )
        self._r.writer = writer
        self._teardown("the batch observers", lambda: self._stop_observers(stop_observers))
        fsync = asyncio.create_task(
            writer.run_fsync(s.journal_fsync_interval_ms / 1000), name="journal-fsync"
        )
        self._teardown("the journal fsync task", lambda: _cancelled(fsync))
        writer.start()
        self._teardown("the ledger writer", lambda: writer.close(timeout_s=5.0))
        deliveries = asyncio.create_task(self.alerts.run(), name="tollgate-alert-webhook")
        self._teardown("the alert webhook", lambda: _cancelled(deliveries))

    async def _start_key_cache(self) -> None:
        """Load the gateway keys before serving, then reload them in the background."""
        keys = KeyCache()
        async with self.pool.connection() as conn:
            count = await keys.refresh(conn)
        log.info("gateway keys: %d active", count)
        self._r.keys = keys
        refresher = asyncio.create_task(
            keys.run(self.pool, self.settings.key_cache_refresh_s), name="tollgate-key-cache"
        )
        self._teardown("the key cache", lambda: _cancelled(refresher))

    async def _start_limits(self) -> None:
        """Load the limits and their spend before serving, then reload them in the background
        (after making the configured default budget what the settings say)."""
        limits = self.limits
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as conn:
            try:
                done = await sync_default_budget(conn, self.settings.default_user_budget)
            except LimitError as exc:
                raise ConfigError(f"default_user_budget: {exc}") from None
            if done != "unchanged":
                log.info("default user budget %s: %s", done, DEFAULT_USER_BUDGET_ID)
        async with self.pool.connection() as conn:
            count = await limits.refresh(conn, self.settings.limit_cache_refresh_s)
        log.info("limits: %d", count)
        refresher = asyncio.create_task(
            limits.run(self.pool, self.settings.limit_cache_refresh_s), name="tollgate-limits"
        )
        self._teardown("the limit cache", lambda: _cancelled(refresher))

    @property
    def keys(self) -> KeyCache:
        assert self._r.keys is not None
        return self._r.keys

    def _grpc_options(self) -> list[tuple[str, Any]]:
        max_message = self.settings.max_body_bytes + _GRPC_OVERHEAD_BYTES
        return [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]

    async def _start_grpc(
        self,
        address: str,
        credentials: grpc.ServerCredentials | None,
        envoy: EnvoyProcess | None,
    ) -> None:
        """The ext_proc listener: ext_proc and gRPC health, nothing else."""
        s = self.settings
        server = grpc.aio.server(options=self._grpc_options())
        context = ProcessorContext(
            sink=self.writer,
            router=self.router,
            policy=PolicyConfig.from_settings(s),
            keys=self.keys,
            limits=self.limits,
            prices=self.prices,
        )
        extproc = ExternalProcessorServicer(lambda: RequestProcessor(context))
        ep_grpc.add_ExternalProcessorServicer_to_server(extproc, server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.grpc_port = _bind(server, address, credentials)
        await server.start()

        async def stop() -> None:
            # Envoy first, so that no request arrives at a server going away.
            if envoy is not None:
                await asyncio.to_thread(envoy.stop)
            await health.enter_graceful_shutdown()
            await server.stop(self._grace_s)

        self._teardown("the ext_proc server", stop)
        for service in ("", EXTPROC_SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._r.extproc = extproc
        self._r.health = health
        self._r.grpc_server = server
        self._r.envoy = envoy

    async def _start_usage_service(self, address: str, token: str) -> None:
        """UsageService on its own listener, every call checked for the bearer token."""
        server = grpc.aio.server(
            options=self._grpc_options(), interceptors=[BearerTokenInterceptor(token)]
        )
        usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(self.pool), server)
        s = self.settings
        # Server TLS only: the token authenticates the caller.
        credentials = (
            grpc.ssl_server_credentials(
                [(_read_pem(s.grpc_tls_key_file), _read_pem(s.grpc_tls_cert_file))]
            )
            if s.grpc_tls_cert_file
            else None
        )
        self.usage_port = _bind(server, _concrete_address(address), credentials)
        await server.start()
        self._teardown("the UsageService server", lambda: server.stop(self._grace_s))

    async def _start_envoy(self, state: Path, s: Settings) -> EnvoyProcess:
        config = state / "envoy.yaml"
        # Rendered in a spawned child, so that the typed Envoy API (envoy-data-plane, about
        # 35 MiB of classes) never loads into the process that serves requests.
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            text = await asyncio.get_running_loop().run_in_executor(
                pool, _render_envoy_yaml, s, self.options.envoy_target
            )
        config.write_text(text, encoding="utf-8")
        envoy = EnvoyProcess(config, log_path=state / "envoy.log")
        self._teardown("envoy", lambda: asyncio.to_thread(envoy.stop))
        await asyncio.to_thread(
            functools.partial(envoy.start, drain_time_s=max(self.settings.shutdown_grace_s, 1))
        )
        return envoy

    async def _start_dashboard(self, state: Path) -> None:
        s = self.settings
        token, self.dashboard_token_file = admin_token(s)  # made here, so it can be shown
        address = _concrete_address(s.dashboard_address)
        env = {
            **os.environ,
            "TOLLGATE_DATABASE_URL": self.database_url,
            "TOLLGATE_STATE_DIR": str(state),
            "TOLLGATE_DASHBOARD_ADDRESS": address,
            "TOLLGATE_DASHBOARD_SESSION_HOURS": str(s.dashboard_session_hours),
            "TOLLGATE_LOG_LEVEL": s.log_level,
        }
        # The child reads the token from the file or its own environment, never argv.
        env.pop("TOLLGATE_DASHBOARD_ADMIN_TOKEN", None)
        env.pop("TOLLGATE_DASHBOARD_ADMIN_TOKEN_FILE", None)
        if self.dashboard_token_file is not None:
            env["TOLLGATE_DASHBOARD_ADMIN_TOKEN_FILE"] = str(self.dashboard_token_file)
        else:
            env["TOLLGATE_DASHBOARD_ADMIN_TOKEN"] = token
        dashboard = DashboardProcess(address, env, log_path=state / "dashboard.log")
        self._teardown("the dashboard", lambda: asyncio.to_thread(dashboard.stop))
        await asyncio.to_thread(dashboard.start)
        self.dashboard_url = dashboard.url

    async def _start_fake_provider(self, state: Path, port: int) -> None:
        fake = FakeProviderProcess(port, log_path=state / "fake-provider.log")
        self._teardown("the fake provider", lambda: asyncio.to_thread(fake.stop))
        await asyncio.to_thread(fake.start)

    async def stop(self, grace_s: float = 3.0) -> None:
        """Run every registered teardown, last started first; safe to call more than once."""
        self._grace_s = grace_s
        exits, self._exits = self._exits, contextlib.AsyncExitStack()
        try:
            await exits.aclose()
        finally:
            self._r = _Running()

    async def wait_for_ledger(self, timeout_s: float = 10.0) -> None:
        """Wait until every submitted record has been written (or the timeout passes)."""
        writer = self.writer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while writer.pending:
            if loop.time() > deadline:
                raise TimeoutError(f"{writer.pending} ledger records still pending")
            await asyncio.sleep(0.02)

    @property
    def extproc(self) -> ExternalProcessorServicer | None:
        return self._r.extproc


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.contextmanager
def stop_signal() -> Iterator[asyncio.Event]:
    """An event set on SIGTERM or SIGINT, with the handlers installed from the start of the
    block: a signal that arrives before anyone waits is not lost."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
