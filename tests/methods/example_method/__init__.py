"""A tiny example method for docs/contributing.md: copy this folder to sparse_ft/methods/<name>/ and
register its config in sparse_ft/methods/__init__.py. tests/methods/test_example_method.py runs it
through the method matrix (apply, save, load, merge, export)."""
from .config import RowDeltaConfig
from .layer import RowDeltaLinear

__all__ = ["RowDeltaConfig", "RowDeltaLinear"]
