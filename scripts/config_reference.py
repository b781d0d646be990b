#!/usr/bin/env python
"""The config reference (every section, key, default and docstring) as Markdown.

    python scripts/config_reference.py --write    # regenerate docs/configuration.md
    python scripts/config_reference.py            # print it

The data comes from :mod:`sparse_ft.config_docs` (the dataclasses' source, read with ast), the same
that ``sparse-ft train --help`` prints. tests/test_docs.py checks that docs/configuration.md equals a
fresh generation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "configuration.md"

HEADER = """# Configuration reference

A run's YAML config has five sections: `model`, `method`, `task`, `train` and `deepspeed`. Any key can
be overridden on the command line as `section.key=value` (`train.lr=3e-2`). The `method` section's
keys depend on `method.name`; each method's table is below. Unknown keys, methods and tasks fail
before any model loads, with a message naming the field and what is allowed.

This page is generated from the config dataclasses' field docstrings by
`python scripts/config_reference.py --write`; a test fails when it is out of date.
"""

from sparse_ft.config_docs import sections  # noqa: E402


def reference() -> str:
    """The whole configuration page."""
    lines = [HEADER]
    for section in sections():
        lines.append(f"## {section.title}\n")
        lines.append("| key | default | meaning |\n|---|---|---|")
        for key in section.keys:
            lines.append(f"| `{key.name}` | `{key.default}` | {key.doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the config reference page.")
    parser.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(ROOT)} instead of printing")
    args = parser.parse_args(argv)
    text = reference()
    if args.write:
        tmp = PAGE.with_name(PAGE.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(PAGE)
        print(PAGE)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
