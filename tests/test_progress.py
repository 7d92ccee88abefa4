"""progress=auto: bars only when the process writes to a terminal, asked of the stdout it started with."""

from __future__ import annotations

import io
import os
import pty
import re
import sys

import pytest

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


@pytest.mark.parametrize("mode", ["auto", "true", "false"])
def test_the_command_on_a_terminal_shows_bars_unless_asked_not_to(mode, main_cli, tiny, tmp_path, monkeypatch):
    """The whole command (ENS4: four slots, then prediction with the four) with its stdout on a
    pseudo-terminal: progress=auto and true draw the slot and prediction bars, false none; the
    stage log lines come in every mode."""
    master, replica = pty.openpty()
    with os.fdopen(master, "rb") as _, os.fdopen(replica, "w") as terminal:
        monkeypatch.setattr(sys, "__stdout__", terminal)
        overrides = [o for o in tiny("ens4") if not o.startswith("progress=")]
        ran = main_cli([*overrides, f"progress={mode}"], tmp_path / "run")
    assert ran.code == 0, ran.err[-2000:]
    bars = ("slots: ", "predict: ")
    if mode == "false":
        assert not any(bar in ran.out + ran.err for bar in bars)
    else:
        for bar in bars:
            assert bar in ran.out + ran.err, bar
    assert "train done in" in ran.out + ran.err and "predict done in" in ran.out + ran.err


def test_the_command_into_a_pipe_writes_log_lines_and_no_bars(main_cli, tiny, tmp_path, monkeypatch):
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "__stdout__", pipe)
        ran = main_cli(tiny("ens4"), tmp_path / "run")
    assert ran.code == 0, ran.err[-2000:]
    assert "slots: " not in ran.out + ran.err and "predict: " not in ran.out + ran.err
    assert "slot_003 trained in" in ran.out + ran.err  # one line per slot instead


@pytest.mark.slow  # the process's own terminal is what is tested
def test_bars_show_on_a_pseudo_terminal_that_reports_no_size(tiny, tmp_path):
    """A pseudo-terminal opened without a size (``script``, some container consoles) reports 0
    columns, and tqdm drew bars 0 characters wide, i.e. nothing: the command gives it a width."""
    import subprocess
    import threading

    from tests.helpers import ENV, REPO

    master, replica = pty.openpty()  # 0 rows x 0 columns
    proc = subprocess.Popen([sys.executable, "-m", "tiled_hydra", *tiny("ens4"), f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=REPO, env=ENV, stdin=subprocess.DEVNULL, stdout=replica, stderr=replica)
    os.close(replica)
    chunks = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(timeout=600) == 0
    reader.join(timeout=30)
    os.close(master)
    shown = b"".join(chunks).decode("utf-8", "replace")
    for bar in ("slots", "predict"):  # a drawn bar: "slots:  25%|███▊     | 1/4 [...]" (a frame, any percentage)
        assert re.search(bar + r": +\d+%\|[^|]+\| \d+/4", shown), shown[:6000]


@pytest.mark.parametrize("mode", ["auto", "false"])
def test_data_loading_follows_the_progress_setting(mode, compose_cfg, tmp_path, monkeypatch, capsys):
    """Generating and reading a data set of more than PROGRESS_MIN_FILES images draws bars on a
    terminal, unless the run says progress=false."""
    from tiled_hydra.build import build_data
    from tiled_hydra.core.tiling import TileGrid
    from tiled_hydra.data.images import PROGRESS_MIN_FILES

    cfg = compose_cfg(["+setup=sm256", f"progress={mode}", f"dataset.root={tmp_path / 'data'}", "dataset.resolution=64",
                       f"dataset.n_train={PROGRESS_MIN_FILES + 1}", "dataset.n_val=0", "dataset.n_test=2"])
    master, replica = pty.openpty()
    with os.fdopen(master, "rb") as _, os.fdopen(replica, "w") as terminal:
        monkeypatch.setattr(sys, "__stdout__", terminal)
        data = build_data(cfg, TileGrid.create(64, 64, 64))
    assert len(data.train) == PROGRESS_MIN_FILES + 1
    drawn = capsys.readouterr().err
    for bar in ("synthetic: generating", "synthetic: train"):
        assert (bar in drawn) == (mode == "auto"), (bar, drawn[-500:])
