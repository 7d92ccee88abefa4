"""In-memory dataset representation shared by every loader.

Every loader returns an :class:`AnomalyData` whose images are already resized to the
setup's image size and held once, as uint8, for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W), RGB (grayscale replicated to 3 channels)
    labels: torch.Tensor  # int64 (N,), 1 = anomalous
    masks: torch.Tensor | None  # bool (N, H, W); None when the dataset has no pixel masks
    paths: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)  # "good" for normal images
    # Each image's own size before resizing (height, width) and its mask file (None: no mask, i.e.
    # an all-normal image): pixel metrics at native resolution read the masks from here.
    native_sizes: list[tuple[int, int]] = field(default_factory=list)
    mask_paths: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> "Split":
        idx = index.tolist()
        return Split(
            images=self.images[index],
            labels=self.labels[index],
            masks=None if self.masks is None else self.masks[index],
            paths=[self.paths[i] for i in idx] if self.paths else [],
            defect_types=[self.defect_types[i] for i in idx] if self.defect_types else [],
            native_sizes=[self.native_sizes[i] for i in idx] if self.native_sizes else [],
            mask_paths=[self.mask_paths[i] for i in idx] if self.mask_paths else [],
        )


@dataclass
class AnomalyData:
    train: Split  # normal images only
    test: Split
    val: Split | None = None  # None: thresholds are cross-fitted on the test set (see postprocess)
