"""When to draw progress bars: ``progress=auto`` (a terminal), ``true`` or ``false``.

The terminal is the one the process started with: W&B replaces ``sys.stdout`` with a capturing
wrapper that is no terminal, so asking ``sys.stdout`` after ``wandb.init`` would turn every bar off.
Without bars, long stages still say in the log when they start and end.
"""

from __future__ import annotations

import sys

PROGRESS = (True, False, "auto")


def on_terminal() -> bool:
    stream = sys.__stdout__
    return bool(stream is not None and stream.isatty())


def show_progress(setting) -> bool:
    """progress: true | false | auto (auto: bars only when the process writes to a terminal)."""
    return setting is True or (setting in (None, "auto") and on_terminal())
