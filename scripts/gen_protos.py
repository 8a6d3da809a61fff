"""Compile Tollgate's own protos (protos/tollgate/v1) into src/tollgate/v1 with grpcio-tools.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: src)
The output is reproducible: the same grpcio-tools version gives the same bytes, which
tests/unit/test_protos_drift.py checks by compiling into a temporary directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted(p for p in (out_dir / "tollgate").rglob("*") if p.is_file())


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src"
    for path in generate(out):
        print(path.relative_to(out))


if __name__ == "__main__":
    main()
