"""Errors raised for bad user input. One type, so the CLI can print them without a traceback."""


class ConfigError(ValueError):
    """A configuration value, path or name the user gave is not valid.

    The message always names the offending field and what is allowed.
    """


class RunError(RuntimeError):
    """A run could not go on for a reason outside the config: a corrupt file, a full or read-only
    disk, a directory another run holds. The message names the path and what to do; the CLI prints
    it as one line (exit 1)."""
