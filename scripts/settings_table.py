"""Print the settings table (Markdown) for docs/configuration.md from tollgate.config.

With ``--write``, replace the table in docs/configuration.md in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tollgate.config import setting_docs

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def table() -> list[str]:
    lines = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, env, default, help_text in setting_docs():
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, tuple):
            default = ",".join(default)
        shown = f"`{default}`" if default != "" else "(empty)"
        lines.append(f"| `{name}` | `{env}` | {shown} | {help_text} |")
    return lines


def write() -> None:
    lines = DOC.read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table()
    DOC.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    if "--write" in sys.argv[1:]:
        write()
    else:
        print("\n".join(table()))


if __name__ == "__main__":
    main()
