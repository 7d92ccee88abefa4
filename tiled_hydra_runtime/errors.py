"""The runtime's one-line errors, with the exit codes of every tiled_hydra command."""


class RuntimeFailure(Exception):
    """A failed run (exit code 1): an artifact that is damaged or incomplete, an unreadable image."""

    exit_code = 1


class UsageError(RuntimeFailure):
    """A usage error (exit code 2): a bad option, an artifact of an unknown format."""

    exit_code = 2
