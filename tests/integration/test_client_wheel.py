"""The `tollgate-client` distribution on its own (issue 16, acceptance 3).

Its wheel is built from `clients/python/`, installed with `--no-index` into a new virtualenv
(so it cannot pull in a dependency: it has none), and used there as an app would: the
virtualenv holds nothing of the server, and a request made with the standard library and
`tollgate.client.headers()` through real Envoy and Tollgate lands in the ledger attributed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import RunningTollgate, row_for

pytestmark = pytest.mark.integration

APP = """
import importlib.util, json, sys, urllib.request
import tollgate.client
from tollgate.client import headers, track_context

assert tollgate.client.__file__.startswith(sys.prefix), tollgate.client.__file__
server_parts = ["tollgate.app", "tollgate.policy", "grpc", "psycopg", "aiohttp", "envoy"]
present = [m for m in server_parts if importlib.util.find_spec(m) is not None]
assert not present, present

body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
with track_context(user_id="wheel-user", tags=["from-wheel"], use_case_name="stdlib"):
    with track_context(tags="inner"):
        request = urllib.request.Request(
            sys.argv[1] + "/chat/completions",
            data=body.encode(),
            headers={"content-type": "application/json", "authorization": "Bearer sk-app",
                     **headers()},
        )
with urllib.request.urlopen(request, timeout=30) as response:
    print(json.dumps({"request_id": response.headers["x-tollgate-request-id"],
                      "modules": sorted(m for m in sys.modules if m.startswith("tollgate"))}))
"""


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_client_wheel_alone_in_a_virtualenv(
    tmp_path: Path, tollgate_up: RunningTollgate, database_url: str
) -> None:
    dist = tmp_path / "dist"
    run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
        "--wheel-dir", dist, REPO / "clients" / "python",
    )  # fmt: skip
    (wheel,) = dist.glob("tollgate_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    # Only the client's own files, no server package marker, and no dependency declared.
    assert sorted(n for n in names if not n.startswith("tollgate_client-")) == sorted(
        f"tollgate/client/{p.name}" for p in (REPO / "src/tollgate/client").glob("*.py")
    )
    assert b"Requires-Dist" not in metadata

    venv = tmp_path / "app-venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # --no-index: nothing but the wheel itself is available to install.
    run(python, "-m", "pip", "install", "--quiet", "--no-index", wheel)
    installed = json.loads(run(python, "-m", "pip", "list", "--format", "json"))
    assert {p["name"] for p in installed} - {"pip", "setuptools"} == {"tollgate-client"}

    # Run away from the repository, whose directories (envoy/, src/) must not be importable.
    out = json.loads(run(python, "-c", APP, tollgate_up.envoy_url, cwd=tmp_path))
    assert set(out["modules"]) == {
        "tollgate",
        "tollgate.client",
        "tollgate.client._attribution",
        "tollgate.client._context",
        "tollgate.client._httpx",
    }
    row = row_for(database_url, out["request_id"])
    assert row["end_user_id"] == "wheel-user"
    assert row["tags"] == ["from-wheel", "inner"]
    assert row["use_case_name"] == "stdlib"
