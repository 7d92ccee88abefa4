"""Memory and time of pixel metrics at native resolution: N test images of S x S px, maps at 512 px.

    python benchmarks/native_metrics_memory.py [--images 20] [--size 2000] [--map-size 512] [--threads 1]

Writes the masks to a temporary folder (one defect region each on half of the images, from 0.005 %
to 2 % of the image), then scores maps of ``--map-size`` px (as an ENS9 run at 512 px would produce)
against them with ``metrics.resolution=native``: each map is upsampled and each mask read one image
at a time. Prints the peak resident memory above the baseline (the 512 px maps themselves are
allocated before the measurement) and the time. Compares with the memory that materialising every
native map and mask at once would take (4 + 1 bytes per pixel, before the exact sort's working set).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from tiled_hydra.metrics import pixel as evaluation
from tiled_hydra.data.base import Split
from tiled_hydra.data.images import resize_mask
from tiled_hydra.core.memory import PeakMemory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--map-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, size, small = args.images, args.size, args.map_size
    with tempfile.TemporaryDirectory() as tmp:
        paths, setup_masks = [], torch.zeros(n, small, small, dtype=torch.bool)
        maps = torch.rand(n, small, small, generator=torch.Generator().manual_seed(0))
        for i in range(n):
            if i % 2:
                paths.append(None)
                continue
            mask = np.zeros((size, size), dtype=bool)
            side = max(1, int(size * np.sqrt(10 ** rng.uniform(-4.3, -1.7))))  # 0.005 % .. 2 % of the image
            y, x = rng.integers(0, size - side, 2)
            mask[y : y + side, x : x + side] = True
            path = Path(tmp) / f"{i:03d}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(path)
            paths.append(str(path))
            setup_masks[i] = torch.from_numpy(resize_mask(mask, (small, small)))
            ys, xs = slice(y * small // size, (y + side) * small // size + 1), slice(x * small // size, (x + side) * small // size + 1)
            maps[i, ys, xs] += 0.5
        split = Split(images=torch.zeros(n, 3, 1, 1, dtype=torch.uint8), labels=torch.tensor([int(p is not None) for p in paths]),
                      masks=setup_masks, native_sizes=[(size, size)] * n, mask_paths=paths)
        cfg = OmegaConf.create(dict(resolution="native", fallback_resolution=512, aupro_fpr_limit=0.3, strict_fpr_limit=0.05,
                                    region_overlap=0.5, region_size_bins=[0.0001, 0.001, 0.01]))
        start = time.perf_counter()
        with PeakMemory("cpu") as peak:
            results = evaluation.pixel_metrics(maps, split, torch.full((n,), 1.0), cfg)
        seconds = time.perf_counter() - start
    pixels = n * size * size
    print("| images | native px | evaluated pixels | sweep | thresholds | peak RSS above baseline | materialised maps+masks | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {size}x{size} | {pixels / 1e6:.0f} M | {'exact' if results['pixel_thresholds'] == 'all' else 'streamed'} | "
          f"{results['pixel_thresholds']} | {peak.bytes / 2**20:.0f} MiB | {pixels * 5 / 2**20:.0f} MiB | {seconds:.1f} |")
    print({k: results[k] for k in ("pixel_AUROC", "pixel_AUPRO", "pixel_AP", "region_count_by_size")})


if __name__ == "__main__":
    main()
