"""MVTec AD folder layout (also used by the synthetic dataset).

::

    ROOT/CATEGORY/train/good/*.png                   normal training images
    ROOT/CATEGORY/test/good/*.png                    normal test images
    ROOT/CATEGORY/test/<defect_type>/NAME.png        anomalous test images
    ROOT/CATEGORY/ground_truth/<defect_type>/NAME_mask.png

MVTec AD has no validation split, so ``val`` is None.
"""

from __future__ import annotations

from pathlib import Path

from tiled_hydra.data.base import AnomalyData, Split
from tiled_hydra.data.images import Sample, list_images, read_split, require_images, require_root
from tiled_hydra.errors import DataError

NORMAL = "good"


def category_dir(dataset: str, root: Path, category: str) -> Path:
    folder = root / str(category)
    if not folder.is_dir():
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise DataError(f"{dataset}: no category '{category}' in {root} (found: {', '.join(found) or 'none'})")
    return folder


def split_samples(dataset: str, folder: Path, split: str, ground_truth: str) -> list[Sample]:
    """Samples of ``folder/split/<type>/``; anomalous ones paired with ``folder/ground_truth/<type>/NAME_mask.png``."""
    split_dir = folder / split
    type_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []
    samples = []
    for type_dir in type_dirs:
        for image in list_images(type_dir):
            if type_dir.name == NORMAL:
                samples.append(Sample(image, label=0))
                continue
            mask = folder / ground_truth / type_dir.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"{dataset}: no mask for anomalous image {image} (expected {mask})")
            samples.append(Sample(image, label=1, defect_type=type_dir.name, mask=mask))
    if not samples:
        raise DataError(f"{dataset}: no images in {split_dir}/*/")
    return samples


def read_mvtec_split(dataset: str, folder: Path, split: str, ground_truth: str, image_size) -> Split:
    return read_split(split_samples(dataset, folder, split, ground_truth), image_size, dataset, with_masks=True, what=split)


def read_train(dataset: str, folder: Path, image_size) -> Split:
    train = [Sample(p, label=0) for p in require_images(dataset, folder / "train" / NORMAL)]
    # Training images are all normal: an all-zero mask per image would only cost memory.
    return read_split(train, image_size, dataset, with_masks=False, what="train")


def load_mvtec(root: str | None, category: str, image_size, name: str = "mvtec") -> AnomalyData:
    """MVTec AD category ``root/category`` with images resized to ``image_size`` (int or [h, w])."""
    folder = category_dir(name, require_root(name, root), category)
    train = read_train(name, folder, image_size)
    test = read_mvtec_split(name, folder, "test", "ground_truth", image_size)
    return AnomalyData(train=train, test=test, val=None)
