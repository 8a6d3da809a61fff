"""Secrets never reach a log line or a repr: every Postgres connection-string form is masked."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import psycopg
import pytest

from tollgate.config import load_settings, mask_dsn
from tollgate.localstack import (
    POSTGRES_SYSTEM_USER,
    EmbeddedPostgres,
    password_file,
    running_postgres_url,
)

SECRET = "Hunter2-s3cret"


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        # URL form: the userinfo password, and password parameters in the query string.
        (f"postgresql://app:{SECRET}@db:5432/ledger", "postgresql://app:***@db:5432/ledger"),
        (f"postgres://app:{SECRET}@db/ledger", "postgres://app:***@db/ledger"),
        (f"postgresql://app:p%40ss{SECRET}@db/x", "postgresql://app:***@db/x"),
        (f"postgresql://app:a@b{SECRET}@db/x", "postgresql://app:***@db/x"),
        (f"postgresql://app:{SECRET}@h1:5432,h2:5433/x", "postgresql://app:***@h1:5432,h2:5433/x"),
        (
            f"postgresql://app@db/x?password={SECRET}&sslmode=require",
            "postgresql://app@db/x?password=***&sslmode=require",
        ),
        (
            f"postgresql://db/x?sslmode=verify-full&PASSWORD={SECRET}",
            "postgresql://db/x?sslmode=verify-full&PASSWORD=***",
        ),
        (
            f"postgresql://db/x?sslkey=/k.pem&sslpassword={SECRET}",
            "postgresql://db/x?sslkey=/k.pem&sslpassword=***",
        ),
        # Keyword form: bare, spaced, quoted with spaces and escaped quotes, unterminated.
        (f"host=db password={SECRET} dbname=x", "host=db password=*** dbname=x"),
        (f"host=db password = {SECRET}", "host=db password = ***"),
        (f"host=db password='{SECRET} with spaces' user=a", "host=db password=*** user=a"),
        (f"password='it\\'s {SECRET}' host=db", "password=*** host=db"),
        (f"password={SECRET}\\ more host=db", "password=*** host=db"),
        (f"host=db password='{SECRET} never closed", "host=db password=***"),
        (f"host=db sslkey=/k.pem sslpassword={SECRET}", "host=db sslkey=/k.pem sslpassword=***"),
        (f"host=db\tPassword={SECRET}", "host=db\tPassword=***"),
    ],
)
def test_every_form_is_masked(dsn: str, masked: str) -> None:
    assert SECRET not in mask_dsn(dsn)
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@db:5432/ledger",
        "postgresql://db/x?sslmode=require&application_name=tollgate",
        "host=db user=app dbname=ledger options='-c statement_timeout=5s'",
        "host=db passfile=/etc/tollgate/pgpass sslkey=/k.pem sslcert=/c.pem",
        "",
    ],
)
def test_what_is_not_a_password_is_kept(dsn: str) -> None:
    assert mask_dsn(dsn) == dsn


def test_settings_repr_masks_a_keyword_dsn_and_the_usage_token() -> None:
    settings = load_settings(
        environ={
            "TOLLGATE_DATABASE_URL": f"host=db user=app password='{SECRET} x'",
            "TOLLGATE_USAGE_SERVICE_ADDRESS": "127.0.0.1:9010",
            "TOLLGATE_USAGE_SERVICE_TOKEN": "tok-" + SECRET,
        }
    )
    text = repr(settings)
    assert SECRET not in text
    assert "database_url='host=db user=app password=***'" in text
    assert "usage_service_token='***'" in text


def test_embedded_postgres_asks_for_the_password(pg_server: EmbeddedPostgres) -> None:
    secret = password_file(pg_server.data_dir)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.read_text().strip() == pg_server.password
    assert len(pg_server.password) >= 32
    without = f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without, connect_timeout=5)
    wrong = f"postgresql://postgres:not-it@127.0.0.1:{pg_server.port}/postgres"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    # The URL Tollgate uses carries it, and a running server is found with it.
    with psycopg.connect(pg_server.url_for("postgres")) as conn:
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    assert running_postgres_url(pg_server.data_dir) == pg_server.url


def test_embedded_postgres_listens_on_loopback_only(pg_server: EmbeddedPostgres) -> None:
    with psycopg.connect(pg_server.url_for("postgres")) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('listen_addresses', 'unix_socket_directories')"
            ).fetchall()
        )
    assert settings == {"listen_addresses": "127.0.0.1", "unix_socket_directories": ""}


def test_embedded_postgres_opens_nothing_outside_its_directories(tmp_path: Path) -> None:
    state = tmp_path / "closed" / "state"
    state.mkdir(parents=True)
    (tmp_path / "closed").chmod(0o700)  # like pytest's and many home directories
    parents = [p for p in state.parents if p != Path("/")]
    modes = {p: p.stat().st_mode for p in [state, *parents]}
    server = EmbeddedPostgres(state / "pgdata")
    try:
        server.start()
        assert {p: p.stat().st_mode for p in modes} == modes
        data = server.data_dir.resolve()
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        if os.geteuid() == 0:  # its own user, in a directory that user owns
            assert server.data_dir.is_symlink()
            assert data.stat().st_uid == pwd.getpwnam(POSTGRES_SYSTEM_USER).pw_uid
        server.stop()

        # A data directory an older Tollgate made with trust auth and no password file.
        hba = server.data_dir / "pg_hba.conf"
        hba.write_text("host all all 127.0.0.1/32 trust\n")
        password_file(server.data_dir).unlink()
        again = EmbeddedPostgres(server.data_dir)
        again.start()
        assert again.password != server.password
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{again.port}/postgres")
        with psycopg.connect(again.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        again.stop()
    finally:
        server.stop()
        server.remove_data()
    assert not server.data_dir.exists()
