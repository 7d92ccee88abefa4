"""An MVTec-layout folder of 1200x800 px images for the end-to-end timing job.

40 training + 45 test images (20 good, 25 with a dark or bright blob and its mask), jittered
copies of scikit-image's `coffee` photo (CC0): shifted by a few pixels, brightness +-5%, noise.

    python benchmarks/e2e_data.py /tmp/e2e   # -> /tmp/e2e/coffee/{train,test,ground_truth}
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def make(root: Path, n_train: int = 40, n_good: int = 20, n_bad: int = 25, size=(1200, 800), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(data.coffee()).resize((size[0] + 32, size[1] + 32), Image.Resampling.BILINEAR), np.float32)
    cat = root / "coffee"
    for d in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (cat / d).mkdir(parents=True, exist_ok=True)

    def jittered() -> np.ndarray:
        dy, dx = rng.integers(0, 32, 2)
        crop = base[dy : dy + size[1], dx : dx + size[0]] * rng.uniform(0.95, 1.05)
        return crop + rng.normal(0, 4, crop.shape)

    def save(path: Path, array: np.ndarray) -> None:
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)

    for i in range(n_train):
        save(cat / f"train/good/{i:03d}.png", jittered())
    for i in range(n_good):
        save(cat / f"test/good/{i:03d}.png", jittered())
    yy, xx = np.mgrid[: size[1], : size[0]]
    for i in range(n_bad):
        image = jittered()
        r = rng.integers(12, 60)
        cy, cx = rng.integers(r, size[1] - r), rng.integers(r, size[0] - r)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[mask] = rng.choice([20.0, 235.0])
        save(cat / f"test/blob/{i:03d}.png", image)
        save(cat / f"ground_truth/blob/{i:03d}_mask.png", mask.astype(np.float32) * 255)
    return root


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
