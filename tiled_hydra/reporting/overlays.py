"""Overlay figures of single test images, at the image's own aspect ratio.

Three panels: the image with the ground-truth contour (green) | the normalised anomaly map over the
image, ground truth (green) and prediction (white) contours | a crop around the worst spot at the
image's own resolution, where a defect of a few pixels is still visible. The worst spot is the
least-detected ground-truth region of a defective image (the largest region when all are found),
or the highest map value of a normal one (the worst false alarm).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from tiled_hydra.data.base import Split  # noqa: E402
from tiled_hydra.data.images import read_image, read_mask  # noqa: E402
from tiled_hydra.errors import DataError  # noqa: E402

PANEL_LONG_SIDE = 480  # px of the full views in the saved figure (at dpi 100)
CROP_SIDE = 96  # native px around the worst spot: a 5 px defect covers ~5 % of the crop's width


def native_view(split: Split, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The image (H, W, 3) uint8 and its mask (H, W) bool at the image's own size, from the files when
    they are there, else the in-memory (resized) copies."""
    image = split.images[index].permute(1, 2, 0).numpy()
    mask = None if split.masks is None else split.masks[index].numpy()
    if split.paths and split.native_sizes:
        try:
            image = np.asarray(read_image(Path(split.paths[index])))
            path = split.mask_paths[index] if split.mask_paths else None
            if split.masks is not None:
                mask = read_mask(Path(path)) if path else np.zeros(image.shape[:2], dtype=bool)
        except (DataError, OSError):
            pass  # the file moved since the run read it: show the resized copy
    return image, mask


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if values.shape == size:
        return values
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def worst_spot(anomaly_map: np.ndarray, mask: np.ndarray | None, prediction: np.ndarray | None) -> tuple[int, int]:
    """(row, col) to crop around (see module doc)."""
    if mask is not None and mask.any():
        regions, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
        hits = np.bincount(regions[prediction].ravel(), minlength=count + 1)[1:] if prediction is not None else np.zeros(count)
        detected = hits / sizes
        worst = int(np.lexsort((-sizes, detected))[0]) + 1  # least detected, then largest
        rows, cols = np.nonzero(regions == worst)
        return int(rows.mean()), int(cols.mean())
    row, col = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    return int(row), int(col)


def crop_box(center: tuple[int, int], shape: tuple[int, int], side: int) -> tuple[slice, slice]:
    out = []
    for c, n in zip(center, shape):
        s = min(side, n)
        start = min(max(c - s // 2, 0), n - s)
        out.append(slice(start, start + s))
    return out[0], out[1]


def display_copies(image: np.ndarray, heat: np.ndarray, panel: tuple[int, int]):
    """``image`` and ``heat`` reduced to ``panel`` (h, w) px when they are larger, and the imshow extent
    that keeps them at native pixel coordinates."""
    h, w = image.shape[:2]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    if panel[0] >= h or panel[1] >= w:
        return image, heat, extent
    small = np.asarray(Image.fromarray(image).resize((panel[1], panel[0]), Image.Resampling.BILINEAR, reducing_gap=2.0))
    small_heat = F.interpolate(torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None], size=panel,
                               mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    return small, small_heat, extent


def contour(ax, mask: np.ndarray | None, color: str) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.0)


def save_overlay(path: Path, split: Split, index: int, norm_map: torch.Tensor, threshold: float, title: str) -> None:
    """``norm_map`` (h, w): the normalised map at the setup's size (0.5 = the pixel threshold)."""
    image, mask = native_view(split, index)
    size = image.shape[:2]
    heat = resize_map(norm_map.numpy(), size)
    prediction = heat >= threshold
    rows, cols = crop_box(worst_spot(heat, mask, prediction), size, CROP_SIDE)
    scale = PANEL_LONG_SIDE / max(size)
    width, height = size[1] * scale, size[0] * scale
    fig, axes = plt.subplots(1, 3, figsize=((2 * width + height + 60) / 100, (height + 50) / 100),
                             gridspec_kw={"width_ratios": [width, width, height]})
    # The full views are drawn from copies at the panel's own pixel size (placed at native
    # coordinates, so the native contours and the crop box align): matplotlib would otherwise
    # resample the native arrays on every draw, ~4x the time for a 1200x800 image.
    shown, shown_heat, extent = display_copies(image, heat, (round(height), round(width)))
    axes[0].imshow(shown, extent=extent)
    contour(axes[0], mask, "lime")
    axes[0].set_title("image, ground truth", fontsize=8)
    axes[1].imshow(shown, extent=extent)
    axes[1].imshow(shown_heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=extent)
    contour(axes[1], mask, "lime")
    contour(axes[1], prediction, "white")
    axes[1].add_patch(plt.Rectangle((cols.start, rows.start), cols.stop - cols.start, rows.stop - rows.start,
                                    fill=False, edgecolor="yellow", linewidth=1))
    axes[1].set_title("anomaly map, prediction (white)", fontsize=8)
    axes[2].imshow(image[rows, cols], interpolation="nearest")
    axes[2].imshow(heat[rows, cols], cmap="jet", alpha=0.3, vmin=0, vmax=1, interpolation="nearest")
    contour(axes[2], None if mask is None else mask[rows, cols], "lime")
    contour(axes[2], prediction[rows, cols], "white")
    axes[2].set_title(f"{rows.stop - rows.start} x {cols.stop - cols.start} px at full resolution", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay_indices(scores: torch.Tensor, labels: torch.Tensor, count: int) -> list[tuple[int, str]]:
    """The highest-scored defective images and the highest-scored normal ones (worst false alarms),
    plus the lowest-scored defective ones (worst misses)."""
    picks: list[tuple[int, str]] = []
    defective = torch.nonzero(labels == 1).flatten()
    normal = torch.nonzero(labels == 0).flatten()
    if len(defective):
        order = defective[scores[defective].argsort(descending=True)]
        picks += [(int(i), "best_detected") for i in order[: max(1, count // 2)]]
        picks += [(int(i), "worst_missed") for i in order.flip(0)[: max(1, count // 4)]]
    if len(normal):
        order = normal[scores[normal].argsort(descending=True)]
        picks += [(int(i), "worst_false_alarm") for i in order[: max(1, count // 4)]]
    seen, unique = set(), []
    for i, tag in picks:
        if i not in seen:
            seen.add(i)
            unique.append((i, tag))
    return unique[:count]


def write_overlays(run_dir: Path, test: Split, scores: torch.Tensor, norm_maps: torch.Tensor,
                  pred_masks: torch.Tensor | None, overlays: int) -> list[Path]:
    """Overlay PNGs (overlays.py) of the best-detected, worst-missed and worst false-alarm test images.
    ``norm_maps`` are normalised so that the pixel threshold is 0.5 (``pred_masks`` is norm_maps >= 0.5)."""
    overlay_dir = run_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, tag in overlay_indices(scores, test.labels, overlays):
        name = Path(test.paths[i]).stem if test.paths else str(i)
        kind = test.defect_types[i] if test.defect_types else ("defect" if test.labels[i] else "good")
        path = overlay_dir / f"{tag}_{kind}_{name}.png"
        save_overlay(path, test, i, norm_maps[i], 0.5, f"{tag}: {kind}/{name}  score {float(scores[i]):.3f}")
        written.append(path)
    return written
