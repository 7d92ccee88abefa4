"""The runtime against the torch engine on the same images: how far apart their maps and labels are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiled_hydra.build import open_trained_run
from tiled_hydra.core.postprocess import POSTPROCESS_FILE, load_postprocessor


@dataclass(frozen=True)
class Agreement:
    images: int
    max_map_difference: float  # max |a - b| of the maps normalised with the run's postprocessor
    max_score_difference: float  # max |a - b| of the normalised image scores
    labels_identical: bool


def engine_predictions(run_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch engine's raw maps and scores of uint8 ``images``, as predict computes them."""
    _, run = open_trained_run(run_dir, device="cpu")
    return run.engine(keep=True)(images)


def agreement(run_dir: Path, images: torch.Tensor, maps: np.ndarray, scores: np.ndarray,
              engine: tuple[torch.Tensor, torch.Tensor] | None = None) -> Agreement:
    """How the runtime's ``maps`` and ``scores`` of ``images`` differ from the engine's (given or computed)."""
    post, _ = load_postprocessor(Path(run_dir) / POSTPROCESS_FILE)
    theirs_maps, theirs_scores = engine if engine is not None else engine_predictions(run_dir, images)
    ours_maps, ours_scores = torch.from_numpy(np.asarray(maps)), torch.from_numpy(np.asarray(scores))
    map_difference = (post.normalize_maps(ours_maps) - post.normalize_maps(theirs_maps)).abs().max()
    score_difference = (post.normalize_scores(ours_scores) - post.normalize_scores(theirs_scores)).abs().max()
    same = bool(torch.equal(post.predict(ours_scores)[0], post.predict(theirs_scores)[0]))
    return Agreement(len(images), float(map_difference), float(score_difference), same)
