"""The committed generated code is exactly what scripts/gen_protos.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), str(tmp_path)],
        check=True,
        timeout=120,
    )
    fresh = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in (tmp_path / "tollgate").rglob("*")
        if p.is_file()
    }
    committed_dir = REPO / "src"
    committed = {
        p.relative_to(committed_dir): p.read_bytes()
        for p in (committed_dir / "tollgate" / "v1").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(committed), (
        "generated file set differs: run scripts/gen_protos.py"
    )
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"stale generated code, run scripts/gen_protos.py: {stale}"
