"""Errors that end a run with a one-line cause (no traceback for the user's own mistakes)."""


class TiledHydraError(Exception):
    """Base class: the message is the one line the user sees."""


class ConfigError(TiledHydraError):
    """A bad or inconsistent configuration value."""


class DataError(TiledHydraError):
    """A dataset that is missing, incomplete or unreadable."""
