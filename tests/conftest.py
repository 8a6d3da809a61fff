"""Shared fixtures: one real Postgres (embedded wheel) per session, a new database per test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tollgate.localstack import EmbeddedPostgres

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    root = tmp_path_factory.mktemp("pg")
    server = EmbeddedPostgres(root / "data", log_path=root / "postgres.log")
    server.start()
    yield server
    server.stop()
    server.remove_data()


@pytest.fixture
def database_url(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """A new, empty database on the session's server (its URL carries the password); dropped
    afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url_for("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_server.url_for(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tollgate_cli(database_url: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``tollgate *args`` as a new process against ``database_url`` (no other TOLLGATE_*
    settings from this environment), in ``workdir``; output captured as text."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_DATABASE_URL=database_url, TOLLGATE_STATE_DIR=str(workdir / "state"))
    return subprocess.run(
        [sys.executable, "-m", "tollgate", *args],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
