"""progress=auto: bars only when the process writes to a terminal, asked of the stdout it started with."""

from __future__ import annotations

import io
import os
import pty
import sys

from tiled_hydra.core.progress import show_progress


def test_auto_draws_bars_on_a_terminal_and_not_into_a_pipe(monkeypatch):
    master, replica = pty.openpty()
    with os.fdopen(master, "rb") as _, os.fdopen(replica, "w") as terminal:  # the master end stays open: a live terminal
        monkeypatch.setattr(sys, "__stdout__", terminal)
        assert show_progress("auto") and show_progress(None)
        assert show_progress(True) and not show_progress(False)
        # W&B swaps sys.stdout for a capturing wrapper that is no terminal: the bars stay
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        assert show_progress("auto")
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "__stdout__", pipe)
        assert not show_progress("auto") and not show_progress(None)
        assert show_progress(True) and not show_progress(False)
    monkeypatch.setattr(sys, "__stdout__", None)  # no stdout at all (a daemon)
    assert not show_progress("auto")
