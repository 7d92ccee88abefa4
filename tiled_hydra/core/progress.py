"""When to draw progress bars: ``progress=auto`` (a terminal), ``true`` or ``false``.

The terminal is the one the process started with: W&B replaces ``sys.stdout`` with a capturing
wrapper that is no terminal, so asking ``sys.stdout`` after ``wandb.init`` would turn every bar off.
Without bars, long stages still say in the log when they start and end.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

PROGRESS = (True, False, "auto")

# The run's setting for bars drawn deep inside data loading (reading images, generating the synthetic
# set), which take no config of their own; None outside a run: a terminal decides.
_DATA_BARS: ContextVar[bool | None] = ContextVar("data_bars", default=None)


def on_terminal() -> bool:
    stream = sys.__stdout__
    return bool(stream is not None and stream.isatty())


def show_progress(setting) -> bool:
    """progress: true | false | auto (auto: bars only when the process writes to a terminal)."""
    return setting is True or (setting in (None, "auto") and on_terminal())


@contextmanager
def data_bars(enabled: bool):
    """Within this block, data loading draws its bars only if ``enabled`` (the run's progress setting)."""
    token = _DATA_BARS.set(bool(enabled))
    try:
        yield
    finally:
        _DATA_BARS.reset(token)


def data_bars_enabled() -> bool:
    enabled = _DATA_BARS.get()
    return on_terminal() if enabled is None else enabled


#: Width given to a terminal that reports none. A pseudo-terminal opened without a size (``script``,
#: some container and IDE consoles) says 0 columns, and tqdm draws a bar as wide as the terminal: nothing.
DEFAULT_COLUMNS = 100


def give_terminal_a_width() -> None:
    """On a terminal of 0 columns, set its size to DEFAULT_COLUMNS x 24 so that bars can be drawn."""
    if not on_terminal():
        return
    try:
        import fcntl
        import struct
        import termios

        fd = sys.__stdout__.fileno()
        rows, columns = struct.unpack("hh", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)[:4])
        if columns <= 0:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows if rows > 0 else 24, DEFAULT_COLUMNS, 0, 0))
    except (ImportError, OSError, ValueError):
        pass  # not a POSIX terminal: tqdm measures it itself
