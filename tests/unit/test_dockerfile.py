"""The Dockerfile, read with ``dockerfile_parse``: what a reviewer checks by eye, as assertions.

Every property is a function returning the problems it finds, so each test can also feed it a
broken Dockerfile and see it complain: the checks are shown to be able to fail.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

UID = "10001"
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
)
# A tag that names one release: digits for at least major.minor.patch, then an optional variant
# (``3.12.8-slim-bookworm``, ``v1.40.0``); ``latest``, ``3-slim`` or ``3.12`` float.
PINNED_TAG = re.compile(r"^v?\d+\.\d+\.\d+([.-][A-Za-z0-9.-]+)?$")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "git", "python3-dev", "libpq-dev")


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[dict[str, Any]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]


@dataclass
class Parsed:
    parser: DockerfileParser
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(content: str) -> Parsed:
    parser = DockerfileParser(fileobj=io.BytesIO(content.encode()))
    stages: list[Stage] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
    return Parsed(parser, stages)


def run_commands(stage: Stage) -> list[list[str]]:
    """Each shell command of the stage's RUN instructions (split at ``&&`` and ``;``) as words,
    without ``--mount``/``--network`` flags of RUN itself."""
    commands: list[list[str]] = []
    for value in stage.values("RUN"):
        words = shlex.split(value)
        while words and words[0].startswith("--"):
            words.pop(0)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


# ---- the checks ------------------------------------------------------------------------------


def pinning_problems(parsed: Parsed) -> list[str]:
    problems = []
    if len(parsed.stages) < 2:
        problems.append(f"{len(parsed.stages)} stage(s); want a build stage and a runtime stage")
    earlier: set[str] = set()
    for stage in parsed.stages:
        if stage.image in earlier:
            continue
        repository, _, tag = stage.image.rpartition(":")
        if not repository or "/" in tag:
            problems.append(f"FROM {stage.image}: no tag")
        elif not PINNED_TAG.match(tag):
            problems.append(f"FROM {stage.image}: tag {tag!r} is not one release")
        if stage.name:
            earlier.add(stage.name)
    return problems


def build_stage_problems(parsed: Parsed) -> list[str]:
    builds = [
        c
        for stage in parsed.stages[:-1]
        for c in run_commands(stage)
        if c[:4] == ["python", "-m", "pip", "wheel"] or c[:3] == ["python", "-m", "build"]
    ]
    if not builds:
        return ["no stage before the last builds a wheel (pip wheel / python -m build)"]
    return []


def runtime_problems(parsed: Parsed) -> list[str]:
    final = parsed.final
    problems = []
    users = final.values("USER")
    if users != [f"{UID}:{UID}"] and users != [UID]:
        problems.append(f"final stage USER {users}; want {UID}:{UID} (numeric, once)")
    if exec_form(" ".join(final.values("ENTRYPOINT"))) != ["tollgate"]:
        problems.append(f"ENTRYPOINT {final.values('ENTRYPOINT')}; want exec form ['tollgate']")
    if exec_form(" ".join(final.values("CMD"))) != ["serve"]:
        problems.append(f"CMD {final.values('CMD')}; want exec form ['serve']")
    for stage in parsed.stages:
        if stage.values("HEALTHCHECK"):
            problems.append("a HEALTHCHECK is declared; Kubernetes probes replace it")
    for value in final.values("COPY") + final.values("ADD"):
        words = value.split()
        if not any(w.startswith("--from=") for w in words):
            problems.append(f"final stage copies from the build context: {value!r}")
    return problems


def install_problems(parsed: Parsed) -> list[str]:
    problems = []
    installs = [c for c in run_commands(parsed.final) if "pip" in c[0] and "install" in c]
    if not installs:
        return ["final stage installs nothing with pip"]
    for command in installs:
        text = " ".join(command)
        if "--no-cache-dir" not in command:
            problems.append(f"pip install without --no-cache-dir: {text}")
        if "[" in text or "-e" in command or "--editable" in command:
            problems.append(f"pip install with extras or editable: {text}")
        targets = [w for w in command[command.index("install") + 1 :] if not w.startswith("-")]
        if not targets or not all(t.endswith(".whl") for t in targets):
            problems.append(f"pip install of something other than the built wheel: {text}")
    for command in run_commands(parsed.final):
        if command[:1] in (["apt-get"], ["apt"]) and "install" in command:
            tools = [w for w in command if w in BUILD_TOOLS]
            if tools:
                problems.append(f"build tools in the final stage: {tools}")
            if not any(
                "/var/lib/apt/lists" in " ".join(c) and c[:2] == ["rm", "-rf"]
                for c in run_commands(parsed.final)
            ):
                problems.append("apt lists are left in the final stage")
    return problems


def label_problems(parsed: Parsed) -> list[str]:
    labels = parsed.parser.labels
    problems = [f"label {name} missing or empty" for name in OCI_LABELS if not labels.get(name)]
    version = labels.get("org.opencontainers.image.version")
    if version != PROJECT["version"]:
        problems.append(f"version label {version!r} != pyproject version {PROJECT['version']!r}")
    licenses = labels.get("org.opencontainers.image.licenses")
    if licenses != PROJECT["license"]:
        problems.append(f"licenses label {licenses!r} != pyproject license {PROJECT['license']!r}")
    source = labels.get("org.opencontainers.image.source", "")
    if not source.startswith("https://"):
        problems.append(f"source label {source!r} is not an https URL")
    return problems


def environment_problems(parsed: Parsed) -> list[str]:
    env = parsed.parser.envs
    want = {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOLLGATE_STATE_DIR": "/var/lib/tollgate",
        "TOLLGATE_METRICS_ADDRESS": "0.0.0.0:9464",
        "TOLLGATE_GRPC_ADDRESS": "unix:/run/tollgate/extproc.sock",
    }
    problems = [f"ENV {k}={env.get(k)!r}; want {v!r}" for k, v in want.items() if env.get(k) != v]
    port = env.get("TOLLGATE_METRICS_ADDRESS", ":").rpartition(":")[2]
    exposed = " ".join(parsed.final.values("EXPOSE")).split()
    if port not in [p.split("/")[0] for p in exposed]:
        problems.append(f"metrics port {port} is not EXPOSEd ({exposed})")
    if exposed and set(exposed) != {port}:
        problems.append(f"EXPOSE {exposed}: only the metrics port has a TCP listener")
    return problems


def ownership_problems(parsed: Parsed) -> list[str]:
    """The user and group 10001 exist, and the state and socket directories are theirs."""
    commands = run_commands(parsed.final)
    problems = []

    def with_flags(command: list[str], *pairs: tuple[str, str]) -> bool:
        adjacent = set(itertools.pairwise(command))
        return all(pair in adjacent for pair in pairs)

    def has(tool: str, *pairs: tuple[str, str]) -> bool:
        return any(c[0] == tool and with_flags(c, *pairs) for c in commands)

    if not has("groupadd", ("--gid", UID)):
        problems.append(f"no groupadd --gid {UID}")
    if not has("useradd", ("--uid", UID), ("--gid", UID)):
        problems.append(f"no useradd --uid {UID} --gid {UID}")
    state_dir = parsed.parser.envs.get("TOLLGATE_STATE_DIR", "")
    socket_dir = str(
        Path(parsed.parser.envs.get("TOLLGATE_GRPC_ADDRESS", "").removeprefix("unix:")).parent
    )
    owned = {
        w
        for c in commands
        if c[:2] == ["install", "-d"] and with_flags(c, ("-o", UID), ("-g", UID))
        for w in c
        if w.startswith("/")
    }
    for directory in (state_dir, socket_dir):
        if directory not in owned:
            problems.append(f"{directory!r} is not created owned by {UID}:{UID}")
    volumes = " ".join(parsed.final.values("VOLUME"))
    if state_dir not in (exec_form(volumes) or volumes.split()):
        problems.append(f"the state directory {state_dir!r} is not a VOLUME")
    return problems


CHECKS = (
    pinning_problems,
    build_stage_problems,
    runtime_problems,
    install_problems,
    label_problems,
    environment_problems,
    ownership_problems,
)


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_dockerfile_passes(dockerfile: str, check: Any) -> None:
    assert check(parse(dockerfile)) == []


# ---- the checks fail on broken Dockerfiles ---------------------------------------------------


def _broken(dockerfile: str, old: str, new: str) -> Parsed:
    assert old in dockerfile, f"the Dockerfile no longer contains {old!r}; update this test"
    return parse(dockerfile.replace(old, new))


@pytest.mark.parametrize(
    ("check", "old", "new", "complaint"),
    [
        (
            pinning_problems,
            "FROM python:3.12.12-slim-bookworm AS runtime",
            "FROM python:latest",
            "not one release",
        ),
        (
            pinning_problems,
            "FROM python:3.12.12-slim-bookworm AS runtime",
            "FROM python:3-slim",
            "not one release",
        ),
        (
            pinning_problems,
            "FROM python:3.12.12-slim-bookworm AS build",
            "FROM python AS build",
            "no tag",
        ),
        (build_stage_problems, "python -m pip wheel", "python -m pip download", "builds a wheel"),
        (runtime_problems, "USER 10001:10001", "USER tollgate", "USER"),
        (runtime_problems, 'CMD ["serve"]', "CMD serve", "CMD"),
        (runtime_problems, 'CMD ["serve"]', 'CMD ["serve"]\nHEALTHCHECK CMD true', "HEALTHCHECK"),
        (
            runtime_problems,
            "USER 10001:10001",
            "COPY src/ /src/\nUSER 10001:10001",
            "build context",
        ),
        (install_problems, "--no-cache-dir ", "", "--no-cache-dir"),
        (install_problems, "/dist/*.whl", "'/dist/*.whl[dev]'", "extras"),
        (install_problems, "/dist/*.whl", ".", "other than the built wheel"),
        (label_problems, 'image.version="0.1.0"', 'image.version="0.0.9"', "pyproject version"),
        (label_problems, "org.opencontainers.image.source=", "x.source=", "source missing"),
        (environment_problems, "PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=0", "PYTHONUNBUFFERED"),
        (environment_problems, "EXPOSE 9464", "EXPOSE 9002", "not EXPOSEd"),
        (ownership_problems, "-o 10001 -g 10001", "-o 0 -g 0", "/run/tollgate"),
        (ownership_problems, "--uid 10001", "--uid 1000", "useradd"),
        (ownership_problems, 'VOLUME ["/var/lib/tollgate"]', "", "VOLUME"),
    ],
)
def test_each_check_catches_a_broken_dockerfile(
    dockerfile: str, check: Any, old: str, new: str, complaint: str
) -> None:
    problems = check(_broken(dockerfile, old, new))
    assert any(complaint in p for p in problems), problems


def test_the_version_label_follows_pyproject() -> None:
    assert PROJECT["version"] == "0.1.0"
    assert (
        parse(DOCKERFILE.read_text(encoding="utf-8")).parser.labels[
            "org.opencontainers.image.version"
        ]
        == PROJECT["version"]
    )


def test_healthcheck_is_left_out_on_purpose_and_says_why(dockerfile: str) -> None:
    comments = " ".join(
        i["value"] for i in parse(dockerfile).parser.structure if i["instruction"] == "COMMENT"
    )
    assert "No HEALTHCHECK" in comments
    assert "Kubernetes" in comments
    assert "probes" in comments


# ---- .dockerignore ---------------------------------------------------------------------------


def _ignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        patterns.append((keep, line.removeprefix("!").strip("/")))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories. ``**`` spans
    any number of directories (here: also none)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    regex = re.compile(
        "^"
        + re.escape(pattern)
        .replace(r"\*\*/", "(?:.*/)?")
        .replace(r"\*\*", ".*")
        .replace(r"\*", "[^/]*")
        .replace(r"\?", "[^/]")
        + "$"
    )
    return any(regex.match(c) for c in candidates)


def excluded(path: str) -> bool:
    """Whether ``path`` (relative to the repo) is kept out of the build context: the last
    matching pattern wins, ``!`` lets a path back in."""
    verdict = False
    for keep, pattern in _ignore_patterns():
        if _pattern_matches(pattern, path):
            verdict = not keep
    return verdict


def _copied_sources(parsed: Parsed) -> list[str]:
    sources = []
    for stage in parsed.stages:
        for value in stage.values("COPY") + stage.values("ADD"):
            words = [w for w in value.split() if not w.startswith("--")]
            if any(w.startswith("--from=") for w in value.split()):
                continue
            sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def test_the_build_context_holds_what_the_build_copies(dockerfile: str) -> None:
    sources = _copied_sources(parse(dockerfile))
    assert sources, "the Dockerfile copies nothing from the context"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not excluded(source), f"{source} is copied but .dockerignore excludes it"
    # Every file of the package is in the context (migrations included), caches are not.
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*") if p.is_file()]
    kept = [p for p in package if not excluded(p)]
    assert any(p.endswith(".sql") for p in kept)
    assert all("__pycache__" not in p and not p.endswith(".pyc") for p in kept)


def test_the_wheel_needs_nothing_outside_the_context() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    for package in wheel["packages"]:
        assert not excluded(package), package
    assert not excluded(PROJECT["readme"])
    assert not excluded("pyproject.toml")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".tollgate/journal/0001",
        "tests/unit/test_config.py",
        ".env",
        "secrets/postgres_password",
        "src/tollgate/__pycache__/cli.cpython-312.pyc",
        "dist/tollgate-0.1.0-py3-none-any.whl",
        ".mypy_cache/x",
        "docker-compose.yml",
    ],
)
def test_the_build_context_leaves_out(path: str) -> None:
    assert excluded(path)


def test_the_ignore_matcher_can_say_no() -> None:
    assert not excluded("src/tollgate/cli.py")
    assert not excluded("README.md")
