"""The offline default dataset: scikit-image textures (CC0) with synthetic defects and exact masks.

Generated once, deterministically from its parameters, into the MVTec AD layout plus a
validation split in the same style::

    ROOT/CATEGORY/train/good/000.png
    ROOT/CATEGORY/test/good/000.png           ROOT/CATEGORY/val/good/000.png
    ROOT/CATEGORY/test/<kind>/000.png         ROOT/CATEGORY/val/<kind>/000.png
    ROOT/CATEGORY/ground_truth/<kind>/000_mask.png
    ROOT/CATEGORY/ground_truth_val/<kind>/000_mask.png
    ROOT/CATEGORY/params.json                 the parameters it was generated from

ROOT defaults to ``$XDG_CACHE_HOME/tiled_hydra/synthetic/<hash of the parameters>`` (``~/.cache``
without XDG_CACHE_HOME), so a parameter change means a new dataset and an unchanged one is reused.
CATEGORY is a texture (brick, grass, gravel: 512x512 gray, shipped inside scikit-image) or an
object photo (coffee, astronaut, chelsea: colour, shipped inside scikit-image).

Normal images are different views of the texture; each defective image carries one defect
(scratch, spot, crack, stain, missing texture). A share ``small_defect_share`` of the defects
covers less than 1% of the image: small defects are what the tiled ensemble is for.

``preset: hard`` (see :data:`PRESETS` and docs/synthetic_data.md) makes the same kinds of defects
smaller (a few px at 1024 px; "small" means < 0.1% of the image) and faint (an additive change of
8-16% of the gray range), adds the nuisance of a real line (illumination gradient, blur, sensor
noise; objects also shift by up to +-10 px and turn by up to +-2 degrees) and offers object
categories: an aligned photo shipped in scikit-image (coffee, astronaut, chelsea), in colour.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from tiled_hydra.config import Count, Range, Seed, Share
from tiled_hydra.data.base import AnomalyData
from tiled_hydra.data.images import PROGRESS_MIN_FILES
from tiled_hydra.data.mvtec import read_mvtec_split, read_train
from tiled_hydra.errors import ConfigError, DataError

log = logging.getLogger("tiled_hydra")

TEXTURES = ("brick", "grass", "gravel")
OBJECTS = ("coffee", "astronaut", "chelsea")  # aligned colour photos shipped in scikit-image (hard preset's objects)
DEFECT_KINDS = ("scratch", "spot", "crack", "stain", "missing")
SMALL_AREA = 0.01  # a "small" defect covers less than this fraction of the image
MIN_CONTRAST = 15.0  # gray levels: mean change inside a defect's mask, so that a model can find it
GENERATOR_VERSION = 1  # part of the cache key: bump it whenever the generated pixels change
SPLITS = {"train": 0, "val": 1, "test": 2}  # fixed codes that seed each split independently


@dataclass(frozen=True)
class Preset:
    """How hard the generated images are (the same generator, other parameters)."""

    resolution: int  # image side when dataset.resolution is null
    size_factor: float  # defect sizes relative to the default preset at the same resolution
    small_area: float  # a "small" defect covers less than this fraction of the image
    contrast: tuple[float, float] | None  # faint additive change, fraction of 255; None: strong darken/brighten
    min_contrast: float  # gray levels a defect must change on average to count as visible
    nuisance: bool  # illumination gradient, blur and sensor noise; objects also shift and turn


PRESETS = {
    "default": Preset(512, 1.0, SMALL_AREA, None, MIN_CONTRAST, False),
    "hard": Preset(1024, 0.3, 0.001, (0.08, 0.16), 8.0, True),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything the generated files depend on."""

    category: str
    resolution: int
    n_train: int
    n_val: int
    val_defective_fraction: float
    n_test: int
    test_defective_fraction: float
    small_defect_share: float
    seed: int
    preset: str = "default"

    def validate(self, dataset: str) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"{dataset}: unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}")
        if self.category not in TEXTURES + OBJECTS:
            raise ConfigError(f"{dataset}: unknown category '{self.category}'; choose one of {', '.join(TEXTURES + OBJECTS)}")
        if self.resolution < 64:
            raise ConfigError(f"{dataset}: resolution must be at least 64 px, got {self.resolution}")
        if self.n_train < 1 or self.n_test < 1 or self.n_val < 0:
            raise ConfigError(f"{dataset}: need n_train >= 1, n_test >= 1 and n_val >= 0")
        for key in ("val_defective_fraction", "test_defective_fraction", "small_defect_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{dataset}: {key} must be in [0, 1], got {getattr(self, key)}")

    def digest(self) -> str:
        """Cache key of the parameters shared by all categories (the category is a sub-folder)."""
        params = {k: v for k, v in asdict(self).items() if k != "category"}
        text = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def seed_sequence(self, split: str, *keys: int) -> list[int]:
        """Entropy of one random stream: textures and splits get independent streams."""
        return [self.seed, (TEXTURES + OBJECTS).index(self.category), SPLITS[split], *keys]

    def split_counts(self, split: str) -> tuple[int, int]:
        """(normal, defective) image counts of a split."""
        total, fraction = {
            "train": (self.n_train, 0.0),
            "val": (self.n_val, self.val_defective_fraction),
            "test": (self.n_test, self.test_defective_fraction),
        }[split]
        defective = int(round(total * fraction))
        return total - defective, defective


# -- defects: each returns the changed image and the exact mask of changed pixels -----------------
def thick_polyline(shape: tuple[int, int], points: np.ndarray, radius: int) -> np.ndarray:
    from scipy import ndimage
    from skimage import draw

    mask = np.zeros(shape, bool)
    for (r0, c0), (r1, c1) in zip(points[:-1], points[1:]):
        rr, cc = draw.line(int(r0), int(c0), int(r1), int(c1))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        mask[rr[keep], cc[keep]] = True
    disk = draw.disk((radius, radius), radius + 0.5)
    footprint = np.zeros((2 * radius + 1,) * 2, bool)
    footprint[disk] = True
    return ndimage.binary_dilation(mask, footprint)


def irregular_blob(shape: tuple[int, int], center: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A star-shaped blob: a circle whose radius wobbles with a few random harmonics."""
    from skimage import draw

    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    wobble = sum(rng.uniform(-0.25, 0.25) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r = radius * (1 + wobble) * rng.uniform(0.6, 1.0, 2)[:, None]  # also stretch it into an ellipse
    rr, cc = draw.polygon(center[0] + r[0] * np.sin(theta), center[1] + r[1] * np.cos(theta), shape)
    mask = np.zeros(shape, bool)
    mask[rr, cc] = True
    return mask


def darken(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    out[mask] *= rng.uniform(0.2, 0.4)
    return out


def brighten(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    out[mask] += (255.0 - out[mask]) * rng.uniform(0.6, 0.8)
    return out


def recolor(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, contrast, bright: bool) -> np.ndarray:
    """Strong darken/brighten (contrast None, default preset) or a faint additive change of contrast x 255."""
    if contrast is None:
        return (brighten if bright else darken)(image, mask, rng)
    out = image.copy()
    out[mask] += (1.0 if bright else -1.0) * rng.uniform(*contrast) * 255.0
    return out


# Sizes are in px of a 512 px image times ``scale`` (image size / 512 x the preset's size factor).
def scratch(image, rng, center, scale, small, contrast):
    length = (rng.uniform(0.08, 0.3) if small else rng.uniform(0.5, 0.9)) * 512 * scale
    angle = rng.uniform(0, np.pi)
    half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
    radius = max(1, round((1 if small else int(rng.integers(4, 6))) * scale))
    mask = thick_polyline(image.shape[:2], np.stack([center - half, center + half]), radius)
    return recolor(image, mask, rng, contrast, bright=True), mask


def crack(image, rng, center, scale, small, contrast):
    steps = int(rng.integers(8, 20) if small else rng.integers(40, 70))
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.5, steps))
    moves = rng.uniform(6, 14, steps)[:, None] * scale * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    points = center + np.concatenate([[[0.0, 0.0]], np.cumsum(moves, axis=0)])
    radius = max(1, round((1 if small else int(rng.integers(2, 4))) * scale))
    mask = thick_polyline(image.shape[:2], points, radius)
    return recolor(image, mask, rng, contrast, bright=False), mask


def spot(image, rng, center, scale, small, contrast):
    radius = (rng.uniform(5, 22) if small else rng.uniform(35, 60)) * scale
    mask = irregular_blob(image.shape[:2], center, radius, rng)
    return recolor(image, mask, rng, contrast, bright=rng.random() >= 0.5), mask


def stain(image, rng, center, scale, small, contrast):
    radius = (rng.uniform(12, 25) if small else rng.uniform(40, 80)) * scale
    mask = irregular_blob(image.shape[:2], center, radius, rng)
    out = image.copy()
    low, high = (30, 45) if contrast is None else (255 * contrast[0], 255 * contrast[1])
    out[mask] += rng.choice([-1.0, 1.0]) * rng.uniform(low, high)  # low contrast, yet above the texture's noise
    return out, mask


def missing(image, rng, center, scale, small, contrast):
    from scipy import ndimage

    radius = (rng.uniform(12, 25) if small else rng.uniform(40, 80)) * scale
    mask = irregular_blob(image.shape[:2], center, radius, rng)
    sigma = 8 * scale
    rows, cols = np.nonzero(mask)
    pad = int(3 * sigma) + 1  # blur a padded crop only: the full image would be needlessly slow
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, image.shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, image.shape[1])
    out = image.copy()
    blurred = ndimage.gaussian_filter(image[r0:r1, c0:c1], sigma=(sigma, sigma) + (0,) * (image.ndim - 2))
    out[r0:r1, c0:c1][mask[r0:r1, c0:c1]] = blurred[mask[r0:r1, c0:c1]]  # texture detail wiped out
    return out, mask


DEFECTS = {"scratch": scratch, "spot": spot, "crack": crack, "stain": stain, "missing": missing}


def add_defect(image: np.ndarray, kind: str, small: bool, rng: np.random.Generator,
               preset: Preset = PRESETS["default"]) -> tuple[np.ndarray, np.ndarray]:
    """Draw defects of ``kind`` until one is visible and in the requested size class (small: below
    the preset's ``small_area``, 1% of the image by default).

    Visible: the mean absolute change inside the mask is at least the preset's ``min_contrast``
    gray levels, which, e.g., rejects a "missing texture" patch on an already smooth part.
    """
    size = image.shape[0]
    scale = size / 512 * preset.size_factor
    for _ in range(100):
        center = rng.uniform(0.15 * size, 0.85 * size, 2)
        out, mask = DEFECTS[kind](image, rng, center, scale, small, preset.contrast)
        area = mask.mean()
        if area > 0 and (area < preset.small_area) == small and np.abs(out - image)[mask].mean() >= preset.min_contrast:
            return out, mask
    return out, mask  # the size ranges make this unreachable in practice; keep the last draw


# -- writing the dataset --------------------------------------------------------------------------
def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).save(path)


def defect_plan(spec: SyntheticSpec, split: str, n_defective: int) -> list[tuple[str, bool]]:
    """(kind, small) per defective image: kinds in turn, exactly round(share * n) small ones, shuffled."""
    rng = np.random.default_rng(spec.seed_sequence(split, 0))
    n_small = int(round(spec.small_defect_share * n_defective))
    kinds = [DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(n_defective)]
    small = rng.permutation([i < n_small for i in range(n_defective)])
    return [(str(kind), bool(is_small)) for kind, is_small in zip(rng.permutation(kinds), small)]


def write_split(spec: SyntheticSpec, split: str, folder: Path, progress) -> None:
    # scipy and scikit-image load only when images are generated, not when a cached dataset is read
    from tiled_hydra.data.views import normal_view, object_photo, object_view, periodic_texture, photometric_nuisance

    n_normal, n_defective = spec.split_counts(split)
    preset = PRESETS[spec.preset]
    image_dir = folder / split
    mask_dir = folder / ("ground_truth" if split == "test" else f"ground_truth_{split}")
    plan = [("good", False)] * n_normal + defect_plan(spec, split, n_defective)
    counters: dict[str, int] = {}
    for i, (kind, small) in enumerate(plan):
        rng = np.random.default_rng(spec.seed_sequence(split, 1, i))  # one stream per image: counts don't shift others
        if spec.category in OBJECTS:
            image = object_view(object_photo(spec.category, spec.resolution), spec.resolution, rng, misalign=preset.nuisance)
        else:
            image = normal_view(periodic_texture(spec.category), spec.resolution, rng)
        name = f"{counters.setdefault(kind, 0):03d}"
        counters[kind] += 1
        if kind != "good":
            image, mask = add_defect(image, kind, small, rng, preset)
            save_png(mask_dir / kind / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        if preset.nuisance:
            image = photometric_nuisance(image, rng)  # the camera sees defect and object alike
        save_png(image_dir / kind / f"{name}.png", image)
        progress.update()


def generate(spec: SyntheticSpec, folder: Path) -> None:
    total = spec.n_train + spec.n_val + spec.n_test
    # the run's progress setting (outside a run a terminal): into a log file a bar's carriage returns
    # are one unreadable line
    from tiled_hydra.core.progress import data_bars_enabled

    with tqdm(total=total, desc="synthetic: generating", unit="img", leave=False,
              disable=total <= PROGRESS_MIN_FILES or not data_bars_enabled()) as bar:
        for split in SPLITS:
            write_split(spec, split, folder, bar)
    (folder / "params.json").write_text(json.dumps({"version": GENERATOR_VERSION, **asdict(spec)}, indent=2) + "\n")


def default_root(spec: SyntheticSpec) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tiled_hydra" / "synthetic" / spec.digest()


def ensure_generated(spec: SyntheticSpec, root: str | Path | None, dataset: str = "synthetic") -> Path:
    """The category folder, generated first unless already there.

    Generation writes into a hidden temporary folder and renames it into place, so an
    interrupted run never leaves half a dataset behind, and two runs racing both end up
    with the same complete one.
    """
    base = Path(root).expanduser() if root else default_root(spec)
    folder = base / spec.category
    if not folder.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        log.info("%s: generating %s into %s", dataset, spec, folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.category}-tmp-", dir=base))
        try:
            generate(spec, tmp)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.is_dir():  # not a lost race with another run: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_params(spec, folder, dataset)
    return folder


def check_params(spec: SyntheticSpec, folder: Path, dataset: str) -> None:
    """A folder given by dataset.root may hold another generation: refuse rather than mix them up."""
    params_file = folder / "params.json"
    expected = {"version": GENERATOR_VERSION, **asdict(spec)}
    try:
        found = json.loads(params_file.read_text())
    except (OSError, ValueError):
        raise DataError(f"{dataset}: {folder} exists but is not a generated dataset (no readable params.json)") from None
    if found != expected:
        changed = ", ".join(sorted(k for k in expected if found.get(k) != expected[k]))
        raise DataError(f"{dataset}: {folder} was generated with other parameters ({changed}); delete it or set another dataset.root")


def load_synthetic(
    image_size,
    category: Literal["brick", "grass", "gravel", "coffee", "astronaut", "chelsea"] = "brick",  # TEXTURES + OBJECTS
    root: str | None = None,
    resolution: Annotated[int, Range(64)] | None = None,  # px
    n_train: Annotated[int, Range(2)] = 40,  # a slot's statistics need two images
    n_val: Annotated[int, Range(0)] = 20,
    val_defective_fraction: Share = 0.5,
    n_test: Count = 40,
    test_defective_fraction: Share = 0.6,
    small_defect_share: Share = 0.5,
    seed: Seed = 0,
    preset: Literal["default", "hard"] = "default",  # PRESETS
    name: str = "synthetic",
) -> AnomalyData:
    """Generate (or reuse) the synthetic dataset and load it through the MVTec loader, val included.

    ``resolution`` None takes the preset's image side (default 512, hard 1024).
    """
    if str(preset) not in PRESETS:
        raise ConfigError(f"{name}: unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    spec = SyntheticSpec(
        category=str(category), resolution=int(PRESETS[str(preset)].resolution if resolution is None else resolution),
        n_train=int(n_train), n_val=int(n_val),
        val_defective_fraction=float(val_defective_fraction), n_test=int(n_test),
        test_defective_fraction=float(test_defective_fraction), small_defect_share=float(small_defect_share),
        seed=int(seed), preset=str(preset),
    )
    spec.validate(name)
    folder = ensure_generated(spec, root, name)
    train = read_train(name, folder, image_size)
    val = read_mvtec_split(name, folder, "val", "ground_truth_val", image_size) if spec.n_val > 0 else None
    test = read_mvtec_split(name, folder, "test", "ground_truth", image_size)
    return AnomalyData(train=train, test=test, val=val)
