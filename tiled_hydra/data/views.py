"""Normal images of the synthetic dataset: views of a texture or of an aligned object photo,
and the imaging nuisance of a real inspection line (the ``hard`` preset).

Arrays are float in gray levels (0..255, not clipped yet): (H, W) for the gray textures,
(H, W, 3) for the colour photos.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

SHIFT_PX_AT_1024 = 10.0  # objects move by up to this many px at 1024 px (scaled with the image)
MAX_ANGLE_DEG = 2.0  # and turn by up to this angle
SENSOR_NOISE = 3.0  # gray levels, on top of the views' own 2-level noise
MAX_BLUR_SIGMA = 1.5  # px: focus variation
GRADIENT = (0.05, 0.15)  # illumination falls off by 2x this across the image, in a random direction


@lru_cache(maxsize=3)
def periodic_texture(name: str) -> np.ndarray:
    """The texture mirrored into a 2x2 block: seamless under circular shifts (no hard edge at the wrap)."""
    tex = getattr(skdata, name)().astype(np.float32)
    top = np.concatenate([tex, tex[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def jitter(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast change of +-10% / +-8 levels and 2 levels of noise."""
    mean = float(view.mean())
    view = (view - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-8.0, 8.0)
    return view + rng.normal(0.0, 2.0, view.shape)


def normal_view(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (size, size) view: random circular shift, flip, 90-degree turn, brightness/contrast, noise.

    The position in the texture is random, so position carries no information about normality.
    """
    rows = (np.arange(size) + rng.integers(texture.shape[0])) % texture.shape[0]
    cols = (np.arange(size) + rng.integers(texture.shape[1])) % texture.shape[1]
    view = texture[np.ix_(rows, cols)]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    view = np.rot90(view, int(rng.integers(4)))
    return jitter(view, rng)


def misalignment_margin(size: int) -> int:
    """Border (px) that a turn of MAX_ANGLE_DEG plus the largest shift can bring into view."""
    return int(np.ceil(SHIFT_PX_AT_1024 * size / 1024 + size * np.sin(np.deg2rad(MAX_ANGLE_DEG)))) + 2


@lru_cache(maxsize=4)
def object_photo(name: str, size: int) -> Image.Image:
    """A scikit-image colour photo resized to (size + 2 margin) square: the aligned 'object' and
    enough real surroundings that a misaligned view never shows an empty border."""
    side = size + 2 * misalignment_margin(size)
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((side, side), Image.BICUBIC)


def object_view(photo: Image.Image, size: int, rng: np.random.Generator, misalign: bool) -> np.ndarray:
    """A (size, size, 3) float view of the photo, shifted by up to +-10 px (at 1024 px) and turned
    by up to +-2 degrees when ``misalign``, then jittered like the texture views."""
    if misalign:
        angle = rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG)
        shift = rng.uniform(-1.0, 1.0, 2) * SHIFT_PX_AT_1024 * size / 1024
        photo = photo.rotate(angle, resample=Image.BILINEAR, translate=(float(shift[1]), float(shift[0])))
    margin = (photo.size[0] - size) // 2
    view = np.asarray(photo.crop((margin, margin, margin + size, margin + size)), dtype=np.float64)
    return jitter(view, rng)


def photometric_nuisance(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Illumination gradient, focus blur and sensor noise, applied after any defect was drawn."""
    h, w = image.shape[:2]
    direction = rng.uniform(0.0, 2 * np.pi)
    rows, cols = np.mgrid[0:h, 0:w]
    ramp = ((rows - (h - 1) / 2) * np.sin(direction) + (cols - (w - 1) / 2) * np.cos(direction)) / max(h, w)
    gain = 1.0 + 2.0 * rng.uniform(*GRADIENT) * ramp
    out = image * (gain if image.ndim == 2 else gain[..., None])
    sigma = rng.uniform(0.0, MAX_BLUR_SIGMA)
    out = ndimage.gaussian_filter(out, sigma=(sigma, sigma) + (0,) * (out.ndim - 2))
    return out + rng.normal(0.0, SENSOR_NOISE, out.shape)
