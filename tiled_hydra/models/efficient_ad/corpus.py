"""Offline image corpora for EfficientAD: teacher distillation and the student's penalty images.

The default corpus is the photos shipped inside scikit-image (CC0 / public domain, no download).
The three textures the synthetic dataset is made of (brick, grass, gravel) are left out, so
neither the teacher nor the penalty ever sees the evaluation images' source.  A user's folder
(ImageNet, Imagenette, ...) replaces it with ``model.distill_dir`` / ``model.penalty_dir``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tiled_hydra.errors import ConfigError

SKIMAGE_IMAGES = (
    "astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "retina", "rocket", "stereo_motorcycle", "text",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def to_rgb_tensor(array: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC (uint8 or bool) -> uint8 (3, H, W)."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    # a copy: an image file's array may be read-only, which torch cannot wrap
    return torch.from_numpy(np.array(array[..., :3], order="C")).permute(2, 0, 1).contiguous()


class ImageCorpus:
    """Random square crops with random scale and flips, from in-memory images or a folder."""

    def __init__(self, folder: str | None = None):
        if folder is None:
            from skimage import data as skdata

            self.files: list[Path] = []
            self.images = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name in SKIMAGE_IMAGES:
                    image = getattr(skdata, name)()
                    self.images.append(to_rgb_tensor(image[0] if isinstance(image, tuple) else image))
            self.identity = "skimage:" + ",".join(SKIMAGE_IMAGES)
        else:
            root = Path(folder).expanduser()
            if not root.is_dir():
                raise ConfigError(f"image folder not found: {root} (model.distill_dir / model.penalty_dir)")
            self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise ConfigError(f"no images (*.jpg, *.png, ...) under {root} (model.distill_dir / model.penalty_dir)")
            self.images = []
            listing = "\n".join(str(p.relative_to(root)) for p in self.files)
            self.identity = f"dir:{root}:{hashlib.sha256(listing.encode()).hexdigest()[:12]}"

    def __len__(self) -> int:
        return len(self.images) or len(self.files)

    def image(self, index: int) -> torch.Tensor:
        if self.images:
            return self.images[index]
        try:
            with Image.open(self.files[index]) as im:
                return to_rgb_tensor(np.asarray(im.convert("RGB")))
        except OSError as err:
            raise ConfigError(f"cannot read image {self.files[index]}: {err}") from None

    def sample(self, n: int, side: int, generator: torch.Generator, scale: tuple[float, float] = (0.5, 2.0),
               grayscale: float = 0.0) -> torch.Tensor:
        """n crops (n, 3, side, side) in [0, 1]: a random window of side*s px (s drawn from ``scale``,
        capped by the image), resized to ``side``, flipped at random, and grey with probability ``grayscale``."""
        crops = []
        for _ in range(n):
            image = self.image(int(torch.randint(len(self), (1,), generator=generator)))
            h, w = image.shape[-2:]
            s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
            window = max(8, min(h, w, round(side * s)))
            y = int(torch.randint(h - window + 1, (1,), generator=generator))
            x = int(torch.randint(w - window + 1, (1,), generator=generator))
            crop = image[:, y : y + window, x : x + window].unsqueeze(0).float().div_(255)
            crop = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=window > side)
            if torch.rand((), generator=generator) < 0.5:
                crop = crop.flip(-1)
            if torch.rand((), generator=generator) < 0.5:
                crop = crop.flip(-2)
            if torch.rand((), generator=generator) < grayscale:
                crop = crop.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
            crops.append(crop)
        return torch.cat(crops).clamp_(0, 1)
