"""Errors that end a run with a one-line cause (no traceback for the user's own mistakes)."""


class TiledHydraError(Exception):
    """Base class: the message is the one line the user sees."""


class ConfigError(TiledHydraError):
    """A bad or inconsistent configuration value."""


class DataError(TiledHydraError):
    """A dataset that is missing, incomplete or unreadable."""


class Interrupted(TiledHydraError):
    """The run was stopped from outside (SIGTERM: a scheduler's preemption, ``kill``, ``docker stop``)."""


def instantiate_checked(node, **kwargs):
    """hydra's instantiate, but a user-facing error raised inside the target stays a one-line error."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, TiledHydraError):
            raise err.__cause__ from None
        raise
