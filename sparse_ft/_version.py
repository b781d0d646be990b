"""The package version, in a module of its own so every layer can read it without importing the
package's public facade (``sparse_ft/__init__.py``)."""
__version__ = "0.1.0"
