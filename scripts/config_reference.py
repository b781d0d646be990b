#!/usr/bin/env python
"""Print the config reference (every section, key, default and docstring) as Markdown.

    python scripts/config_reference.py > /tmp/ref.md   # paste into README.md's "Config reference"

The data comes from :mod:`sparse_ft.config_docs` (the dataclasses' source, read with ast), the
same that ``sparse-ft train --help`` prints. tests/test_readme.py checks that README.md documents
every key this prints.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ft.config_docs import sections  # noqa: E402


def main() -> int:
    for section in sections():
        print(f"#### {section.title}\n")
        print("| key | default | meaning |\n|---|---|---|")
        for key in section.keys:
            print(f"| `{key.name}` | `{key.default}` | {key.doc.replace('|', '/')} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
