"""Reading image and mask files into a :class:`Split`: the part every loader shares.

A loader only decides *which* files make up a split (a list of :class:`Sample`);
:func:`read_split` reads them, checks them against each other and stacks them.
Every problem a user can cause ends in a one-line :class:`DataError` that names the file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tiled_hydra.data.base import Split
from tiled_hydra.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PROGRESS_MIN_FILES = 48  # below this a progress bar is only noise
READ_THREADS = min(4, os.cpu_count() or 1)  # image files decoded at once


@dataclass(frozen=True)
class Sample:
    """One image of a split: its file, its label and, for anomalous images, its mask file."""

    image: Path
    label: int  # 1 = anomalous
    defect_type: str = "good"
    mask: Path | None = None


def image_size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``512`` or ``[h, w]`` -> ``(h, w)``."""
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        try:
            height, width = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ConfigError(f"image_size must be an int or [height, width], got {image_size!r}") from None
    if height <= 0 or width <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size!r}")
    return height, width


def require_root(dataset: str, root: str | Path | None) -> Path:
    """The dataset root as a Path: unset -> ConfigError, missing -> DataError."""
    if root is None or str(root) == "":
        raise ConfigError(f"{dataset}: no dataset folder given; set dataset.root=DIR")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{dataset}: dataset root {path} does not exist")
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def require_images(dataset: str, folder: Path) -> list[Path]:
    """The images in ``folder``; a missing or image-less folder is a DataError."""
    if not folder.is_dir():
        raise DataError(f"{dataset}: folder {folder} does not exist")
    files = list_images(folder)
    if not files:
        raise DataError(f"{dataset}: no images in {folder}")
    return files


def _open(path: Path, dataset: str, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not later
    except FileNotFoundError:
        raise DataError(f"{dataset}: {what} file missing: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{dataset}: cannot read {what} {path} ({reason})") from None
    return image


def read_image(path: Path, dataset: str = "data") -> Image.Image:
    """An image file as RGB; grayscale, palette and 16-bit images are converted."""
    image = _open(path, dataset, "image")
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit gray: PIL's convert("RGB") would clip at 255. Map the full 16-bit range instead,
        # the same for every image, so brightness differences between images survive.
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def read_mask(path: Path, dataset: str = "data") -> np.ndarray:
    """A mask file as bool (H, W): any non-zero pixel (in any color channel) is anomalous."""
    mask = _open(path, dataset, "mask")
    if mask.mode == "P":
        mask = mask.convert("RGB")  # palette indices say nothing; their colors do
    array = np.asarray(mask)
    if mask.mode in ("RGBA", "LA"):
        array = array[..., :-1]  # an opaque alpha channel is not an anomaly
    return array.any(axis=-1) if array.ndim == 3 else array != 0


def resize_image(image: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (3, H, W). PIL's bilinear filter widens its support when shrinking, i.e. it antialiases."""
    if image.size != (size_hw[1], size_hw[0]):
        image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)  # a writable copy for torch


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """bool (H, W); nearest neighbour keeps the mask binary and its regions where they are."""
    if mask.shape == size_hw:
        return mask
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST)
    return np.asarray(small) > 0


def read_split(samples: Sequence[Sample], image_size, dataset: str, with_masks: bool, what: str = "images") -> Split:
    """Read, resize and stack ``samples``.

    ``with_masks``: the dataset has pixel masks, so every anomalous sample must name one
    (normal samples get an empty mask). Without, ``Split.masks`` is None.
    """
    height, width = image_size_hw(image_size)
    images = torch.empty((len(samples), 3, height, width), dtype=torch.uint8)
    masks = torch.zeros((len(samples), height, width), dtype=torch.bool) if with_masks else None

    def load(sample: Sample) -> tuple[tuple[int, int], np.ndarray, np.ndarray | None]:
        image = read_image(sample.image, dataset)
        resized = resize_image(image, (height, width))
        if not with_masks or (sample.label == 0 and sample.mask is None):
            return (image.height, image.width), resized, None
        if sample.mask is None:
            raise DataError(f"{dataset}: no mask for anomalous image {sample.image}")
        mask = read_mask(sample.mask, dataset)
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"{dataset}: mask size {mask.shape[1]}x{mask.shape[0]} of {sample.mask} differs from "
                f"image size {image.width}x{image.height} of {sample.image}"
            )
        return (image.height, image.width), resized, resize_mask(mask, (height, width))

    from tiled_hydra.core.progress import data_bars_enabled  # the run's progress setting; outside a run a terminal

    native_sizes = []
    # PIL releases the GIL while it decodes and resizes: a few threads read in parallel; results
    # (and the first error) come back in the samples' order
    with ThreadPoolExecutor(READ_THREADS) as pool:
        loaded = pool.map(load, samples)
        for i, (native, image, mask) in enumerate(tqdm(loaded, total=len(samples), desc=f"{dataset}: {what}",
                                                       unit="img", leave=False,
                                                       disable=len(samples) <= PROGRESS_MIN_FILES or not data_bars_enabled())):
            native_sizes.append(native)
            images[i] = torch.from_numpy(image)
            if mask is not None:
                masks[i] = torch.from_numpy(mask)
    return Split(
        images=images,
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        masks=masks,
        paths=[str(s.image) for s in samples],
        defect_types=[s.defect_type for s in samples],
        native_sizes=native_sizes,
        mask_paths=[str(s.mask) if with_masks and s.mask is not None else None for s in samples],
    )
