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
CATEGORY is the texture: brick, grass or gravel (512x512 gray, shipped inside scikit-image).

Normal images are different views of the texture; each defective image carries one defect
(scratch, spot, crack, stain, missing texture). A share ``small_defect_share`` of the defects
covers less than 1% of the image: small defects are what the tiled ensemble is for.
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

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw
from tqdm import tqdm

from tiled_hydra.data.base import AnomalyData
from tiled_hydra.data.images import PROGRESS_MIN_FILES
from tiled_hydra.data.mvtec import read_mvtec_split, read_train
from tiled_hydra.errors import ConfigError, DataError

log = logging.getLogger("tiled_hydra")

TEXTURES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("scratch", "spot", "crack", "stain", "missing")
SMALL_AREA = 0.01  # a "small" defect covers less than this fraction of the image
MIN_CONTRAST = 15.0  # gray levels: mean change inside a defect's mask, so that a model can find it
GENERATOR_VERSION = 1  # part of the cache key: bump it whenever the generated pixels change
SPLITS = {"train": 0, "val": 1, "test": 2}  # fixed codes that seed each split independently


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

    def validate(self, dataset: str) -> None:
        if self.category not in TEXTURES:
            raise ConfigError(f"{dataset}: unknown category '{self.category}'; choose one of {', '.join(TEXTURES)}")
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
        return [self.seed, TEXTURES.index(self.category), SPLITS[split], *keys]

    def split_counts(self, split: str) -> tuple[int, int]:
        """(normal, defective) image counts of a split."""
        total, fraction = {
            "train": (self.n_train, 0.0),
            "val": (self.n_val, self.val_defective_fraction),
            "test": (self.n_test, self.test_defective_fraction),
        }[split]
        defective = int(round(total * fraction))
        return total - defective, defective


# -- normal images --------------------------------------------------------------------------------
def periodic_texture(name: str) -> np.ndarray:
    """The texture mirrored into a 2x2 block: seamless under circular shifts (no hard edge at the wrap)."""
    tex = getattr(skdata, name)().astype(np.float32)
    top = np.concatenate([tex, tex[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def normal_view(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (size, size) view: random circular shift, flip, 90-degree turn, brightness/contrast, noise."""
    rows = (np.arange(size) + rng.integers(texture.shape[0])) % texture.shape[0]
    cols = (np.arange(size) + rng.integers(texture.shape[1])) % texture.shape[1]
    view = texture[np.ix_(rows, cols)]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    view = np.rot90(view, int(rng.integers(4)))
    mean = float(view.mean())
    view = (view - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-8.0, 8.0)
    return view + rng.normal(0.0, 2.0, view.shape)


# -- defects: each returns the changed image and the exact mask of changed pixels -----------------
def thick_polyline(shape: tuple[int, int], points: np.ndarray, radius: int) -> np.ndarray:
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


def scratch(image, rng, center, scale, small):
    length = (rng.uniform(0.08, 0.3) if small else rng.uniform(0.5, 0.9)) * image.shape[0]
    angle = rng.uniform(0, np.pi)
    half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
    radius = max(1, round((1 if small else int(rng.integers(4, 6))) * scale))
    mask = thick_polyline(image.shape, np.stack([center - half, center + half]), radius)
    return brighten(image, mask, rng), mask


def crack(image, rng, center, scale, small):
    steps = int(rng.integers(8, 20) if small else rng.integers(40, 70))
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.5, steps))
    moves = rng.uniform(6, 14, steps)[:, None] * scale * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    points = center + np.concatenate([[[0.0, 0.0]], np.cumsum(moves, axis=0)])
    radius = max(1, round((1 if small else int(rng.integers(2, 4))) * scale))
    mask = thick_polyline(image.shape, points, radius)
    return darken(image, mask, rng), mask


def spot(image, rng, center, scale, small):
    radius = (rng.uniform(5, 22) if small else rng.uniform(35, 60)) * scale
    mask = irregular_blob(image.shape, center, radius, rng)
    return (darken if rng.random() < 0.5 else brighten)(image, mask, rng), mask


def stain(image, rng, center, scale, small):
    radius = (rng.uniform(12, 25) if small else rng.uniform(40, 80)) * scale
    mask = irregular_blob(image.shape, center, radius, rng)
    out = image.copy()
    out[mask] += rng.choice([-1.0, 1.0]) * rng.uniform(30, 45)  # low contrast, yet above the texture's noise
    return out, mask


def missing(image, rng, center, scale, small):
    radius = (rng.uniform(12, 25) if small else rng.uniform(40, 80)) * scale
    mask = irregular_blob(image.shape, center, radius, rng)
    sigma = 8 * scale
    rows, cols = np.nonzero(mask)
    pad = int(3 * sigma) + 1  # blur a padded crop only: the full image would be needlessly slow
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, image.shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, image.shape[1])
    out = image.copy()
    blurred = ndimage.gaussian_filter(image[r0:r1, c0:c1], sigma=sigma)
    out[r0:r1, c0:c1][mask[r0:r1, c0:c1]] = blurred[mask[r0:r1, c0:c1]]  # texture detail wiped out
    return out, mask


DEFECTS = {"scratch": scratch, "spot": spot, "crack": crack, "stain": stain, "missing": missing}


def add_defect(image: np.ndarray, kind: str, small: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw defects of ``kind`` until one is visible and in the requested size class (small: < 1% of the area).

    Visible: the mean absolute change inside the mask is at least MIN_CONTRAST gray levels, which,
    e.g., rejects a "missing texture" patch that happens to lie on an already smooth part.
    """
    size = image.shape[0]
    scale = size / 512
    for _ in range(100):
        center = rng.uniform(0.15 * size, 0.85 * size, 2)
        out, mask = DEFECTS[kind](image, rng, center, scale, small)
        area = mask.mean()
        if area > 0 and (area < SMALL_AREA) == small and np.abs(out - image)[mask].mean() >= MIN_CONTRAST:
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


def write_split(spec: SyntheticSpec, split: str, folder: Path, texture: np.ndarray, progress) -> None:
    n_normal, n_defective = spec.split_counts(split)
    image_dir = folder / split
    mask_dir = folder / ("ground_truth" if split == "test" else f"ground_truth_{split}")
    plan = [("good", False)] * n_normal + defect_plan(spec, split, n_defective)
    counters: dict[str, int] = {}
    for i, (kind, small) in enumerate(plan):
        rng = np.random.default_rng(spec.seed_sequence(split, 1, i))  # one stream per image: counts don't shift others
        image = normal_view(texture, spec.resolution, rng)
        name = f"{counters.setdefault(kind, 0):03d}"
        counters[kind] += 1
        if kind != "good":
            image, mask = add_defect(image, kind, small, rng)
            save_png(mask_dir / kind / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        save_png(image_dir / kind / f"{name}.png", image)
        progress.update()


def generate(spec: SyntheticSpec, folder: Path) -> None:
    texture = periodic_texture(spec.category)
    total = spec.n_train + spec.n_val + spec.n_test
    with tqdm(total=total, desc="synthetic: generating", unit="img", leave=False, disable=total <= PROGRESS_MIN_FILES) as bar:
        for split in SPLITS:
            write_split(spec, split, folder, texture, bar)
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
    category: str = "brick",
    root: str | None = None,
    resolution: int = 512,
    n_train: int = 40,
    n_val: int = 20,
    val_defective_fraction: float = 0.5,
    n_test: int = 40,
    test_defective_fraction: float = 0.6,
    small_defect_share: float = 0.5,
    seed: int = 0,
    name: str = "synthetic",
) -> AnomalyData:
    """Generate (or reuse) the synthetic dataset and load it through the MVTec loader, val included."""
    spec = SyntheticSpec(
        category=str(category), resolution=int(resolution), n_train=int(n_train), n_val=int(n_val),
        val_defective_fraction=float(val_defective_fraction), n_test=int(n_test),
        test_defective_fraction=float(test_defective_fraction), small_defect_share=float(small_defect_share),
        seed=int(seed),
    )
    spec.validate(name)
    folder = ensure_generated(spec, root, name)
    train = read_train(name, folder, image_size)
    val = read_mvtec_split(name, folder, "val", "ground_truth_val", image_size) if spec.n_val > 0 else None
    test = read_mvtec_split(name, folder, "test", "ground_truth", image_size)
    return AnomalyData(train=train, test=test, val=val)
