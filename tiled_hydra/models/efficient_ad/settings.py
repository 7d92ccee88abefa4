"""EfficientAD's settings that the configuration check reads without torch."""

from __future__ import annotations

from typing import Annotated, TypedDict

from tiled_hydra.config import Count, NonNegative, Positive, Range, Seed

MIN_TILE = 64  # smallest side: five stride-2 encoder convolutions leave 2 px, the PDN 8 px


class DistillSettings(TypedDict):
    """``model.net.distill``: the one-time teacher distillation (teacher.DistillRecipe)."""

    steps: Count
    batch_size: Count
    crop_size: Annotated[int, Range(MIN_TILE)]  # PDN input px
    lr: Positive
    weight_decay: NonNegative
    stats_batches: Count  # batches that estimate the target's channel mean and std
    seed: Seed
