"""The `tollgate` command: argument parsing only; the work is done in `app` and friends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from tollgate.config import ConfigError, Settings, load_settings, mask_dsn
from tollgate.ledger.limits import MEASURES, MODES, PERIODS, SCOPES

__all__ = ["main"]

log = logging.getLogger("tollgate")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tollgate")
    except PackageNotFoundError:
        return "unknown"


def _when(text: str) -> datetime:
    """ISO date or date-time; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            value = datetime.combine(date.fromisoformat(text), datetime.min.time())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _limit_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    parser.add_argument("--subject", help="the user id or key id (user and key scopes only)")
    parser.add_argument(
        "--time-zone",
        default="UTC" if defaults else None,
        help="IANA time zone the calendar periods follow (default UTC)",
    )
    parser.add_argument("--mode", choices=MODES, default="block" if defaults else None)
    parser.add_argument(
        "--thresholds",
        type=lambda text: [t.strip() for t in text.split(",")],
        help="alert at these fractions of the maximum (default 0.8,1)",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate",
        description="Per-user usage and cost attribution for LLM traffic through Envoy.",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (or TOLLGATE_CONFIG)")
    parser.add_argument("--version", action="version", version=f"tollgate {_version()}")
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        help="log lines as JSON objects or text (default: the log_format setting; else json "
        "for serve, text otherwise)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="offline quick start: stack + fake provider + SDK calls + report"
    )
    demo.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the stack and its dashboard running after the report until Ctrl-C "
        "(default: when stdin is a terminal)",
    )
    sub.add_parser(
        "up", help="local all-in-one: Postgres, ext_proc server, dashboard and Envoy on :10000"
    )
    sub.add_parser(
        "dashboard",
        help="the usage web UI and its /api/v1/ JSON and CSV API on dashboard_address",
    )
    sub.add_parser(
        "serve",
        help="the sidecar: ext_proc gRPC server with health, /healthz, /readyz and /metrics",
        description="Serve ext_proc (and gRPC health) on grpc_address and /metrics, /healthz "
        "and /readyz on metrics_address, with the ledger writer. SIGTERM drains: health goes "
        "NOT_SERVING at once, new streams are served for shutdown_delay_s, in-flight ones get "
        "shutdown_grace_s, the writer flushes, exit 0.",
    )
    sub.add_parser("migrate", help="apply the ledger's SQL migrations")

    drain = sub.add_parser(
        "envoy-drain",
        help="drain an Envoy (e.g. a preStop hook): stop new connections, wait for requests",
    )
    drain.add_argument(
        "--admin-address",
        default="127.0.0.1:9901",
        help="Envoy's admin host:port (default 127.0.0.1:9901)",
    )
    drain.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        help="most seconds to wait for Envoy's active requests to end (default 30)",
    )

    conf = sub.add_parser("envoy-config", help="render the Envoy bootstrap")
    conf.add_argument("--target", choices=("local", "compose", "kubernetes"), default="local")
    conf.add_argument("--output", "-o", type=Path, help="write here instead of stdout")

    usage = sub.add_parser("usage", help="query the ledger")
    usage.add_argument("--user", help="only this end user")
    usage.add_argument("--since", type=_when, help="from this ISO date/time (inclusive, UTC)")
    usage.add_argument("--until", type=_when, help="up to this ISO date/time (exclusive, UTC)")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--tag", help="only requests carrying this tag")
    usage.add_argument("--format", choices=("table", "json", "csv"), default="table")
    usage.add_argument("--by-user", action="store_true", help="totals per user instead of rows")
    usage.add_argument("--limit", type=int, default=10_000, help="most rows to print")

    keys = sub.add_parser("keys", help="gateway keys: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key; it is shown once")
    create.add_argument("--name", required=True, help="what the key is for (shown in lists)")
    create.add_argument("--user", metavar="USER_ID", help="attribute every request to this user")
    create.add_argument(
        "--enforce-user-id",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require an end-user id on this key's requests (default: the global setting)",
    )
    create.add_argument(
        "--provider",
        action="append",
        metavar="PROVIDER",
        help="allow only this provider (repeatable; default: any)",
    )
    create.add_argument(
        "--credentials",
        choices=("inject", "passthrough"),
        default="inject",
        help="inject the provider key the gateway holds (default), or pass the app's own "
        "provider key through",
    )
    create.add_argument("--format", choices=("text", "json"), default="text")
    listing = keys_sub.add_parser("list", help="list keys (never their plaintext)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (within key_cache_refresh_s)")
    revoke.add_argument("key_id", metavar="KEY_ID")

    viewers = sub.add_parser(
        "viewers", help="dashboard viewer tokens (one gateway key's rows): create, list, revoke"
    )
    viewers_sub = viewers.add_subparsers(dest="viewers_command", required=True, metavar="ACTION")
    v_create = viewers_sub.add_parser("create", help="create a viewer token; it is shown once")
    v_create.add_argument("--key", required=True, metavar="KEY_ID", help="the gateway key it sees")
    v_create.add_argument("--name", help="who or what it is for (default: viewer of KEY_ID)")
    v_create.add_argument("--format", choices=("text", "json"), default="text")
    v_list = viewers_sub.add_parser("list", help="list viewer tokens (never their plaintext)")
    v_list.add_argument("--all", action="store_true", help="include revoked ones")
    v_list.add_argument("--format", choices=("table", "json"), default="table")
    v_revoke = viewers_sub.add_parser("revoke", help="revoke a viewer token (within ~5 s)")
    v_revoke.add_argument("viewer_id", metavar="VIEWER_ID")

    limits = sub.add_parser("limits", help="limits: create, list, show, update, delete")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    l_create = limits_sub.add_parser(
        "create", help="create a limit (its current period starts with the spend already recorded)"
    )
    l_create.add_argument("limit_id", metavar="LIMIT_ID")
    l_create.add_argument("--scope", required=True, choices=SCOPES)
    l_create.add_argument("--measure", required=True, choices=MEASURES)
    l_create.add_argument("--max", required=True, dest="maximum", help="the most per period")
    l_create.add_argument("--period", required=True, choices=PERIODS)
    _limit_options(l_create)
    l_list = limits_sub.add_parser("list", help="list limits")
    l_list.add_argument("--format", choices=("table", "json"), default="table")
    l_show = limits_sub.add_parser("show", help="a limit with its spend in the current period")
    l_show.add_argument("limit_id", metavar="LIMIT_ID")
    l_show.add_argument("--subject", help="only this user's (key's) spend")
    l_show.add_argument("--format", choices=("text", "json"), default="text")
    l_update = limits_sub.add_parser("update", help="change a limit")
    l_update.add_argument("limit_id", metavar="LIMIT_ID")
    l_update.add_argument("--scope", choices=SCOPES)
    l_update.add_argument("--measure", choices=MEASURES)
    l_update.add_argument("--max", dest="maximum")
    l_update.add_argument("--period", choices=PERIODS)
    l_update.add_argument(
        "--no-subject", action="store_true", help="charge each user (key) separately"
    )
    _limit_options(l_update, defaults=False)
    l_delete = limits_sub.add_parser("delete", help="delete a limit and its spend")
    l_delete.add_argument("limit_id", metavar="LIMIT_ID")

    reprice = sub.add_parser("reprice", help="fill in costs of rows priced as unknown")
    reprice.add_argument(
        "--since", type=_when, required=True, help="from this ISO date/time (inclusive, UTC)"
    )
    reprice.add_argument("--until", type=_when, help="up to this ISO date/time (default: now)")

    prune = sub.add_parser("prune", help="drop monthly ledger partitions older than a date")
    prune.add_argument(
        "--before",
        type=date.fromisoformat,
        required=True,
        metavar="DATE",
        help="drop partitions whose whole month ends on or before this ISO date (UTC)",
    )
    prune.add_argument("--dry-run", action="store_true", help="list them, drop nothing")

    fake = sub.add_parser("fake-provider", help="run the built-in fake OpenAI-compatible upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8090)
    fake.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    fake.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "fake-provider":
        from tollgate import fakeprovider

        if bool(args.tls_cert) != bool(args.tls_key):
            sys.exit("tollgate: --tls-cert and --tls-key go together")
        tls = ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key] if args.tls_cert else []
        fakeprovider.main(["--host", args.host, "--port", str(args.port), *tls])
        return
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        sys.exit(f"tollgate: {exc}")
    from tollgate.logs import configure_logging

    log_format = args.log_format or settings.log_format.lower()
    if not log_format:
        log_format = "json" if args.command == "serve" else "text"
    configure_logging(settings.log_level, log_format)
    try:
        code = asyncio.run(_run(args, settings))
    except KeyboardInterrupt:
        code = 130
    except ConfigError as exc:
        sys.exit(f"tollgate: {exc}")
    except (OSError, RuntimeError) as exc:
        log.error("%s", exc)
        code = 1
    sys.exit(code)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    command: str = args.command
    if command == "envoy-config":
        from tollgate.envoyconf import render_yaml

        text = render_yaml(settings, args.target)
        if args.output:
            args.output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    if command == "migrate":
        from tollgate.app import ledger_database, run_migrations

        async with ledger_database(settings) as url:
            applied = await run_migrations(url)
        print(f"applied: {', '.join(applied)}" if applied else "ledger schema is up to date")
        return 0
    if command == "usage":
        return await _usage(args, settings)
    if command == "envoy-drain":
        from tollgate.envoyadmin import drain_envoy

        active = await asyncio.to_thread(drain_envoy, args.admin_address, args.timeout_s)
        if active:
            print(f"envoy still had {active} active requests after {args.timeout_s}s")
            return 1
        print("envoy drained: no active requests")
        return 0
    if command == "reprice":
        return await _reprice(args, settings)
    if command == "keys":
        return await _keys(args, settings)
    if command == "limits":
        return await _limits(args, settings)
    if command == "prune":
        return await _prune(args, settings)
    if command == "demo":
        wait = sys.stdin.isatty() if args.wait is None else args.wait
        return await _demo(settings, wait=wait)
    if command == "dashboard":
        return await _dashboard(settings)
    if command == "viewers":
        return await _viewers(args, settings)
    if command in ("up", "serve"):
        return await _serve(settings, with_envoy=command == "up")
    raise AssertionError(command)


async def _usage(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database
    from tollgate.ledger.queries import UsageFilter, fetch_requests, fetch_user_totals
    from tollgate.usage_report import format_requests, format_user_totals

    where = UsageFilter(args.user, args.since, args.until, args.model, args.tag)
    async with ledger_database(settings) as url, await psycopg.AsyncConnection.connect(url) as conn:
        if args.by_user:
            out = format_user_totals(await fetch_user_totals(conn, where), args.format)
        else:
            out = format_requests(await fetch_requests(conn, where, limit=args.limit), args.format)
    sys.stdout.write(out)
    return 0


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database, run_migrations
    from tollgate.keys_report import format_created_key, format_key_list
    from tollgate.policy.keys import GatewayKeyError, create_key, list_keys, revoke_key

    action: str = args.keys_command
    async with ledger_database(settings) as url:
        await run_migrations(url)
        async with await psycopg.AsyncConnection.connect(url) as conn:
            if action == "create":
                try:
                    plaintext, key = await create_key(
                        conn,
                        name=args.name,
                        end_user_id=args.user,
                        enforce_user_id=args.enforce_user_id,
                        allowed_providers=args.provider,
                        inject_credentials=args.credentials == "inject",
                    )
                except GatewayKeyError as exc:
                    print(f"tollgate: {exc}", file=sys.stderr)
                    return 2
                out = format_created_key(plaintext, key, args.format)
            elif action == "list":
                out = format_key_list(await list_keys(conn, include_revoked=args.all), args.format)
            elif action == "revoke":
                if not await revoke_key(conn, args.key_id):
                    print(
                        f"tollgate: no active gateway key {args.key_id!r}"
                        " (unknown or already revoked)",
                        file=sys.stderr,
                    )
                    return 1
                out = (
                    f"revoked {args.key_id}; Tollgate stops accepting it within about"
                    f" {settings.key_cache_refresh_s}s\n"
                )
            else:
                raise AssertionError(action)
    sys.stdout.write(out)
    return 0


async def _dashboard(settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database, run_migrations, stop_signal
    from tollgate.ledger.migrate import pending_migrations
    from tollgate.web.server import serve_dashboard

    if not settings.dashboard_address:
        print("tollgate: dashboard_address is empty: nowhere to listen", file=sys.stderr)
        return 2
    async with ledger_database(settings) as url:
        # Only when something is pending: the dashboard may run as a read-only database role,
        # with `tollgate migrate` (or the migrate Job) done by a role that may.
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            pending = await pending_migrations(conn)
        if pending:
            try:
                await run_migrations(url)
            except psycopg.errors.InsufficientPrivilege:
                names = ", ".join(f"{m.version:03d}_{m.name}" for m in pending)
                print(
                    f"tollgate: the ledger lacks migrations ({names}) and this database role "
                    "may not apply them: run `tollgate migrate` with one that may",
                    file=sys.stderr,
                )
                return 2
        print(f"ledger:   {mask_dsn(url)}", flush=True)
        with stop_signal() as stop:
            await serve_dashboard(settings, url, stop)
    return 0


async def _viewers(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database, run_migrations
    from tollgate.keys_report import format_created_viewer, format_viewer_list
    from tollgate.ledger.viewers import ViewerError, create_viewer, list_viewers, revoke_viewer

    action: str = args.viewers_command
    async with ledger_database(settings) as url:
        await run_migrations(url)
        async with await psycopg.AsyncConnection.connect(url) as conn:
            if action == "create":
                try:
                    plaintext, viewer = await create_viewer(
                        conn, key_id=args.key, name=args.name or f"viewer of {args.key}"
                    )
                except ViewerError as exc:
                    print(f"tollgate: {exc}", file=sys.stderr)
                    return 2
                out = format_created_viewer(plaintext, viewer, args.format)
            elif action == "list":
                out = format_viewer_list(
                    await list_viewers(conn, include_revoked=args.all), args.format
                )
            elif action == "revoke":
                if not await revoke_viewer(conn, args.viewer_id):
                    print(
                        f"tollgate: no active viewer token {args.viewer_id!r}"
                        " (unknown or already revoked)",
                        file=sys.stderr,
                    )
                    return 1
                out = f"revoked {args.viewer_id}; the dashboard stops accepting it within ~5s\n"
            else:
                raise AssertionError(action)
    sys.stdout.write(out)
    return 0


async def _limits(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database, run_migrations
    from tollgate.ledger import limits as store
    from tollgate.limits_report import format_limit, format_limit_list

    action: str = args.limits_command
    async with ledger_database(settings) as url:
        await run_migrations(url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            try:
                limit: store.Limit | None
                if action == "list":
                    sys.stdout.write(format_limit_list(await store.list_limits(conn), args.format))
                    return 0
                if action == "delete":
                    if not await store.delete_limit(conn, args.limit_id):
                        print(f"tollgate: no limit {args.limit_id!r}", file=sys.stderr)
                        return 1
                    sys.stdout.write(f"deleted limit {args.limit_id}\n")
                    return 0
                if action == "create":
                    limit = await store.create_limit(
                        conn,
                        limit_id=args.limit_id,
                        scope=args.scope,
                        measure=args.measure,
                        maximum=args.maximum,
                        period=args.period,
                        subject=args.subject,
                        time_zone=args.time_zone,
                        mode=args.mode,
                        thresholds=args.thresholds,
                    )
                elif action == "update":
                    limit = await store.update_limit(
                        conn,
                        args.limit_id,
                        scope=args.scope,
                        measure=args.measure,
                        maximum=args.maximum,
                        period=args.period,
                        subject=args.subject,
                        clear_subject=args.no_subject,
                        time_zone=args.time_zone,
                        mode=args.mode,
                        thresholds=args.thresholds,
                    )
                else:
                    limit = await store.get_limit(conn, args.limit_id)
            except store.LimitError as exc:
                print(f"tollgate: {exc}", file=sys.stderr)
                return 2
            if limit is None:
                print(f"tollgate: no limit {args.limit_id!r}", file=sys.stderr)
                return 1
            subject = args.subject if action == "show" else None
            start, reset, spent = await store.limit_spend(conn, limit, subject)
    sys.stdout.write(format_limit(limit, start, reset, spent, args.format))
    return 0


async def _reprice(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database, run_migrations
    from tollgate.ledger.reprice import reprice
    from tollgate.pricing import PriceBook, parse_overrides

    prices = PriceBook(parse_overrides(settings.price_overrides))
    until = args.until or datetime.now(UTC)
    async with ledger_database(settings) as url:
        await run_migrations(url)
        async with await psycopg.AsyncConnection.connect(url) as conn:
            result = await reprice(conn, prices, since=args.since, until=until)
    print(
        f"examined {result.examined} unpriced rows, priced {result.priced}, "
        f"added {result.cost_added} USD"
    )
    return 0


async def _prune(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from tollgate.app import ledger_database, run_migrations
    from tollgate.ledger.prune import prune_partitions

    async with ledger_database(settings) as url:
        await run_migrations(url)
        async with await psycopg.AsyncConnection.connect(url) as conn:
            try:
                names = await prune_partitions(conn, args.before, dry_run=args.dry_run)
            except psycopg.errors.LockNotAvailable:
                print("tollgate: tollgate.requests stayed locked; try again", file=sys.stderr)
                return 1
    verb = "would drop" if args.dry_run else "dropped"
    for name in names:
        print(f"{verb} tollgate.{name}")
    if not names:
        print(f"no ledger partition ends on or before {args.before.isoformat()}")
    print(
        "the rollups (daily_usage, daily_users, monthly_users, daily_totals) are kept:"
        " totals for pruned months stay"
    )
    return 0


async def _demo(settings: Settings, *, wait: bool) -> int:
    from tollgate.demo import DEMO_CALLS, DemoResult, run_demo
    from tollgate.usage_report import format_user_totals

    users = len({call.user for call in DEMO_CALLS if call.user})
    print(
        f"Tollgate demo: {len(DEMO_CALLS)} chat completions as {users} users and one without a"
        " user id, through Envoy…",
        flush=True,
    )

    def report(result: DemoResult) -> None:
        print()
        print(format_user_totals(result.totals, "table"), end="")
        state = settings.resolved_state_dir()
        print(
            f"\nDone in {result.seconds:.1f}s. Every call went app → Envoy → Tollgate (ext_proc) →"
            " fake provider,\nand its usage landed in Postgres (tollgate.requests).\n",
            flush=True,
        )
        if result.dashboard_url:
            token = (
                f"the admin token is in {result.dashboard_token_file}"
                if result.dashboard_token_file
                else "sign in with dashboard_admin_token"
            )
            print(f"Dashboard: {result.dashboard_url} ({token})", flush=True)
            if wait:
                print("It stays up until Ctrl-C.", flush=True)
            else:
                print("(stopped with the demo; `tollgate dashboard` serves it again)", flush=True)
        print(
            "\nWhere to look next:\n"
            "  tollgate usage --user alice             # alice's calls, row by row\n"
            "  tollgate usage --by-user --format csv   # the table above as CSV\n"
            "  tollgate dashboard                      # the web UI over this ledger\n"
            "  tollgate up                             # Envoy on :10000, SDK base_url .../v1\n"
            f"  {state}   # ledger data and logs\n",
            flush=True,
        )

    await run_demo(settings, report, wait=wait)
    return 0


def _shown_address(address: str, port: int) -> str:
    if address.startswith("unix:"):
        return address
    return f"{address.rpartition(':')[0]}:{port}"


async def _serve(settings: Settings, *, with_envoy: bool) -> int:
    from tollgate.app import Stack, StackOptions, stop_signal

    stack = Stack(settings, StackOptions(run_envoy=with_envoy, run_dashboard=with_envoy))
    await stack.start()
    # Handlers stay installed through the shutdown: a second SIGTERM while stopping must not
    # kill the process halfway (the stop is already under way).
    with stop_signal() as stop:
        try:
            print(f"ledger:   {mask_dsn(stack.database_url)}", flush=True)
            tls = " (mutual TLS)" if settings.grpc_tls_client_ca_file else ""
            print(
                f"ext_proc: {_shown_address(settings.grpc_address, stack.grpc_port)}{tls}",
                flush=True,
            )
            if settings.usage_service_address:
                print(
                    "usage:    "
                    f"{_shown_address(settings.usage_service_address, stack.usage_port)}"
                    " (UsageService, bearer token)",
                    flush=True,
                )
            if with_envoy:
                print(
                    f"envoy:    http://{settings.envoy_listen_address}:"
                    f"{settings.envoy_listen_port} → {stack.router.route('/').base_uri}"
                    f" (default provider {settings.default_provider})",
                    flush=True,
                )
            if settings.metrics_address:
                print(
                    f"http:     http://{settings.metrics_address}/metrics, /healthz, /readyz",
                    flush=True,
                )
            if stack.dashboard_url:
                token = (
                    f"admin token in {stack.dashboard_token_file}"
                    if stack.dashboard_token_file
                    else "admin token: dashboard_admin_token"
                )
                print(f"dashboard: {stack.dashboard_url} ({token})", flush=True)
            print("tollgate is ready; Ctrl-C or SIGTERM stops everything", flush=True)
            await stop.wait()
            log.info("stop requested: draining")
            await stack.drain()
        finally:
            await stack.stop()
    return 0
