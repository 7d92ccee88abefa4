"""Image files as the run's dataset read them (tiled_hydra.data.images): RGB, 16-bit grey mapped
to 8 bits over its full range, then PIL's bilinear resize to the setup's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tiled_hydra_runtime.errors import RuntimeFailure

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: Path) -> Image.Image:
    """An image file as RGB; grayscale, palette, alpha and 16-bit images are converted."""
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here
    except FileNotFoundError:
        raise RuntimeFailure(f"image file missing: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeFailure(f"cannot read image {path} ({reason})") from None
    if image.mode == "I" or image.mode.startswith("I;16"):
        # PIL's convert("RGB") would clip 16-bit values at 255: map the full range, as training did
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def resize_image(image: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (3, H, W); PIL's bilinear filter widens its support when shrinking (it antialiases)."""
    if image.size != (size_hw[1], size_hw[0]):
        image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)
