#!/usr/bin/env python
"""The config reference (every section, key, default and docstring) as Markdown.

    python scripts/config_reference.py --write    # regenerate docs/configuration.md
    python scripts/config_reference.py            # print it

tests/test_docs.py checks that docs/configuration.md equals a fresh generation.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
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


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (the LitGPT habit), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def sections():
    from sparse_ft.config import SECTIONS
    from sparse_ft.methods import METHODS

    for name, cls in SECTIONS.items():
        yield f"`{name}`", cls
    for name, cls in sorted(METHODS.items()):
        yield f"`method` (name: {name})", cls


def reference() -> str:
    """The whole configuration page."""
    lines = [HEADER]
    for title, cls in sections():
        docs = field_docs(cls)
        lines.append(f"## {title}\n")
        lines.append("| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            lines.append(f"| `{f.name}` | `{default_of(f)}` | {docs.get(f.name, '').replace('|', '/')} |")
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
