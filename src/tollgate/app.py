"""Wiring and lifecycle: database, ledger writer, gRPC servers, Envoy; graceful drain on stop.

Start order: Postgres (embedded unless configured) → migrations → pool → ledger writer →
gRPC (ext_proc, health, UsageService) → Envoy. Stop order is the reverse: Envoy stops taking
traffic, health goes NOT_SERVING, the gRPC server stops with a grace period, the writer
drains its queue, the pool closes, Postgres shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from psycopg_pool import AsyncConnectionPool

from tollgate.config import ConfigError, Settings, mask_url
from tollgate.envoyconf import render_yaml
from tollgate.extproc.processor import PolicyConfig, ProcessorContext, RequestProcessor
from tollgate.extproc.server import ExternalProcessorServicer
from tollgate.ledger.journal import Journal
from tollgate.ledger.migrate import apply_migrations
from tollgate.ledger.service import UsageServicer
from tollgate.ledger.writer import LedgerWriter
from tollgate.localstack import (
    EmbeddedPostgres,
    EnvoyProcess,
    FakeProviderProcess,
    free_port,
    running_postgres_url,
)
from tollgate.metrics import start_metrics_server
from tollgate.policy.keys import KeyCache
from tollgate.pricing import PriceBook, parse_overrides
from tollgate.routing.allowlist import BaseUriAllowList, InvalidBaseUri
from tollgate.routing.providers import load_providers
from tollgate.routing.router import Router
from tollgate.v1 import usage_pb2_grpc

__all__ = [
    "Stack",
    "StackOptions",
    "build_router",
    "ledger_database",
    "run_migrations",
    "stop_signal",
]

log = logging.getLogger(__name__)

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
    envoy_target: str = "local"


@dataclass
class _Running:
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
    writer: LedgerWriter | None = None
    server: grpc.aio.Server | None = None
    health: health_aio.HealthServicer | None = None
    envoy: EnvoyProcess | None = None
    fake: FakeProviderProcess | None = None
    metrics_stop: Callable[[], None] | None = None
    extproc: ExternalProcessorServicer | None = None
    keys: KeyCache | None = None
    key_refresher: asyncio.Task[None] | None = None
    journal: Journal | None = None
    fsync: asyncio.Task[None] | None = None
    exits: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)


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
        self.database_url = ""
        self.grpc_port = 0

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
            self.database_url = await self._r.exits.enter_async_context(ledger_database(s))
            log.info("ledger database: %s", mask_url(self.database_url))
            applied = await run_migrations(self.database_url)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            await self._start_pool()
            self._start_writer()
            await self._start_key_cache()
            # Children are forked before gRPC starts its threads (fork with them is unsafe).
            grpc_address = _concrete_address(s.grpc_address)
            if self.options.fake_provider_port is not None:
                await self._start_fake_provider(state, self.options.fake_provider_port)
            if self.options.run_envoy:
                await self._start_envoy(state, s.with_overrides(grpc_address=grpc_address))
            await self._start_grpc(grpc_address)
            if s.metrics_address:
                self._r.metrics_stop = start_metrics_server(s.metrics_address, self)
        except BaseException:
            await self.stop()
            raise

    async def _start_pool(self) -> None:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.database_url,
            min_size=1,
            # the writer's batches in flight, plus the key cache, usage service and partitions
            max_size=self.settings.writer_concurrency + 3,
            open=False,
            name="tollgate-ledger",
        )
        await pool.open()
        await pool.wait(timeout=30)
        self._r.pool = pool

    def _start_writer(self) -> None:
        s = self.settings
        journal = Journal(s.resolved_state_dir() / "journal")
        self._r.journal = journal
        self._r.writer = LedgerWriter(
            self.pool,
            queue_size=s.writer_queue_size,
            batch_size=s.writer_batch_size,
            flush_interval_s=s.writer_flush_interval_ms / 1000,
            prices=self.prices,
            journal=journal,
            journal_max_bytes=s.journal_max_bytes,
            reject_when_full=s.journal_full_policy == "reject",
            concurrency=s.writer_concurrency,
        )
        self._r.writer.start()
        self._r.fsync = asyncio.create_task(
            self._r.writer.run_fsync(s.journal_fsync_interval_ms / 1000), name="journal-fsync"
        )

    async def _start_key_cache(self) -> None:
        """Load the gateway keys before serving, then reload them in the background."""
        keys = KeyCache()
        async with self.pool.connection() as conn:
            count = await keys.refresh(conn)
        log.info("gateway keys: %d active", count)
        self._r.keys = keys
        self._r.key_refresher = asyncio.create_task(
            keys.run(self.pool, self.settings.key_cache_refresh_s), name="tollgate-key-cache"
        )

    @property
    def keys(self) -> KeyCache:
        assert self._r.keys is not None
        return self._r.keys

    async def _start_grpc(self, address: str) -> None:
        s = self.settings
        max_message = s.max_body_bytes + _GRPC_OVERHEAD_BYTES
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                ("grpc.so_reuseport", 0),
            ]
        )
        context = ProcessorContext(
            sink=self.writer,
            router=self.router,
            policy=PolicyConfig.from_settings(s),
            keys=self.keys,
        )
        extproc = ExternalProcessorServicer(lambda: RequestProcessor(context))
        ep_grpc.add_ExternalProcessorServicer_to_server(extproc, server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(self.pool), server)
        self.grpc_port = server.add_insecure_port(address)
        if self.grpc_port == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address} (in use?)")
        await server.start()
        for service in ("", EXTPROC_SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._r.server, self._r.health, self._r.extproc = server, health, extproc

    async def _start_envoy(self, state: Path, s: Settings) -> None:
        config = state / "envoy.yaml"
        config.write_text(render_yaml(s, self.options.envoy_target), encoding="utf-8")
        envoy = EnvoyProcess(config, log_path=state / "envoy.log")
        self._r.envoy = envoy
        await asyncio.to_thread(envoy.start)

    async def _start_fake_provider(self, state: Path, port: int) -> None:
        fake = FakeProviderProcess(port, log_path=state / "fake-provider.log")
        self._r.fake = fake
        await asyncio.to_thread(fake.start)

    async def stop(self, grace_s: float = 3.0) -> None:
        """Stop everything in reverse order; safe to call more than once."""
        r = self._r
        if r.envoy is not None:
            await asyncio.to_thread(r.envoy.stop)
        if r.health is not None:
            await r.health.enter_graceful_shutdown()
        if r.server is not None:
            await r.server.stop(grace_s)
        if r.fake is not None:
            await asyncio.to_thread(r.fake.stop)
        if r.key_refresher is not None:
            r.key_refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await r.key_refresher
        if r.writer is not None:
            await r.writer.close(timeout_s=5.0)
        if r.fsync is not None:
            r.fsync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await r.fsync
        if r.journal is not None:
            r.journal.close()
        if r.metrics_stop is not None:
            r.metrics_stop()
        if r.pool is not None:
            await r.pool.close()
        await r.exits.aclose()
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
