"""Command-line entry points (top layer: they may import any part of the package)."""
