"""Print the settings table (Markdown) for docs/configuration.md from tollgate.config."""

from __future__ import annotations

from tollgate.config import setting_docs


def main() -> None:
    print("| setting | environment variable | default | meaning |")
    print("|---|---|---|---|")
    for name, env, default, help_text in setting_docs():
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, tuple):
            default = ",".join(default)
        shown = f"`{default}`" if default != "" else "(empty)"
        print(f"| `{name}` | `{env}` | {shown} | {help_text} |")


if __name__ == "__main__":
    main()
