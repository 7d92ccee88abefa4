"""Image and pixel metrics: AUROC, F1 and AUPRO (per-region overlap up to a false-positive rate).

Pixel metrics sweep every distinct map value as a threshold, exactly (ties are one
threshold): the pixels are sorted once and every curve is a cumulative sum over that
order, so 100 maps of 512x512 (26M pixels) need one sort and a few linear passes
(under 1 GB of working memory). Pixel AUROC and AUPRO share that sweep: exact, with no
threshold binning. Image AUROC and both F1 scores use torchmetrics; on pixels its exact
AUROC would sort a second time (~1.5 GB) and its binned one needs values in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from tiled_hydra.metrics.image import f1, image_metrics

# Connected components within an image (8-connectivity), never across images of the stack.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


@dataclass
class PixelCurves:
    """Values at every distinct threshold, highest threshold first, starting at (0, 0, 0)."""

    fpr: torch.Tensor  # false positives / normal pixels (outside every mask, all images)
    tpr: torch.Tensor  # true positives / anomalous pixels
    pro: torch.Tensor  # mean over ground-truth regions of the fraction of the region detected
    num_normal: int = 0
    num_anomalous: int = 0


def sort_with_tie_runs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened ``values`` sorted high to low, the sort order, and the last index of each run of equal values.

    A cumulative sum over the sorted order, read at the run ends, gives its value at every
    distinct threshold (predicting ``value >= threshold``): tied values always count together.
    """
    sorted_values, order = torch.sort(values.detach().reshape(-1).cpu(), descending=True)
    # sort puts NaN and +inf first and -inf last: checking both ends checks every value
    if not (torch.isfinite(sorted_values[0]) and torch.isfinite(sorted_values[-1])):
        raise ValueError("scores or maps contain NaN or infinite values")
    run_ends = torch.nonzero(sorted_values[1:] != sorted_values[:-1]).squeeze(1)
    run_ends = torch.cat([run_ends, torch.tensor([sorted_values.numel() - 1])])
    return sorted_values, order, run_ends


def pixel_curves(maps: torch.Tensor, masks: torch.Tensor) -> PixelCurves | None:
    """ROC and PRO curves of (N, H, W) maps against bool masks; None if a class of pixels is missing."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    masks_np = masks.detach().cpu().numpy().astype(bool, copy=False)
    regions, num_regions = ndimage.label(masks_np, structure=_EIGHT_CONNECTED_PER_IMAGE)
    return region_curves(maps, torch.from_numpy(regions), num_regions)


def region_curves(values: torch.Tensor, regions: torch.Tensor, num_regions: int) -> PixelCurves | None:
    """Exact curves of pixel ``values`` whose ground truth is ``regions`` (same number of elements):
    0 = normal pixel, k > 0 = a pixel of ground-truth region k (1..num_regions)."""
    regions = regions.reshape(-1)
    num_pixels = regions.numel()
    num_anomalous = int((regions != 0).sum())
    num_normal = num_pixels - num_anomalous
    if num_anomalous == 0 or num_normal == 0:
        return None

    order, run_ends = sort_with_tie_runs(values)[1:]  # sorted values not needed: drop them now
    regions = regions[order].long()
    del order

    is_normal = regions == 0
    count_dtype = torch.int32 if num_pixels < 2**31 else torch.int64  # int32 cumsum is ~2x faster
    false_pos = torch.cumsum(is_normal, 0, dtype=count_dtype)[run_ends].long()
    true_pos = run_ends + 1 - false_pos
    # PRO is linear in the pixels: each pixel of region k adds 1 / (num_regions * |k|), so
    # PRO after the first j anomalous pixels (in score order) is a cumulative sum over them.
    anomalous_regions = regions[~is_normal]
    region_size = torch.bincount(anomalous_regions, minlength=num_regions + 1).double()
    pixel_weight = 1.0 / (num_regions * region_size.clamp(min=1))  # clamp: id 0 (normal) has no pixels here
    zero = torch.zeros(1, dtype=torch.float64)
    pro_after = torch.cat([zero, torch.cumsum(pixel_weight[anomalous_regions], 0)])  # [j]: after j pixels
    pro = pro_after[true_pos]

    return PixelCurves(
        fpr=torch.cat([zero, false_pos.double() / num_normal]),
        tpr=torch.cat([zero, true_pos.double() / num_anomalous]),
        pro=torch.cat([zero, pro]),
        num_normal=num_normal,
        num_anomalous=num_anomalous,
    )


def average_precision(curves: PixelCurves | None) -> float:
    """Pixel average precision: sum over thresholds of (recall step) x precision, as scikit-learn
    defines it (no interpolation); NaN without both classes of pixels."""
    if curves is None:
        return math.nan
    true_pos = curves.tpr[1:] * curves.num_anomalous
    predicted = true_pos + curves.fpr[1:] * curves.num_normal
    precision = true_pos / predicted  # predicted > 0 after the leading (0, 0) point
    return float((torch.diff(curves.tpr) * precision).sum())


def area_up_to(x: torch.Tensor, y: torch.Tensor, x_limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_limit], divided by x_limit.

    ``x`` is non-decreasing from 0 and reaches ``x_limit``; y is interpolated linearly
    at exactly ``x_limit`` so the area never spills past it (so a y <= 1 gives <= 1).
    """
    first_beyond = int(torch.searchsorted(x, torch.tensor([x_limit], dtype=x.dtype), right=True))
    if first_beyond == len(x):  # x_limit is the curve's last x
        y_limit = y[-1]
    else:
        x0, x1 = x[first_beyond - 1], x[first_beyond]
        y0, y1 = y[first_beyond - 1], y[first_beyond]
        y_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
    xs = torch.cat([x[:first_beyond], torch.tensor([x_limit], dtype=x.dtype)])
    ys = torch.cat([y[:first_beyond], y_limit.reshape(1)])
    return float(torch.trapezoid(ys, xs)) / x_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit``: in [0, 1].

    PRO is averaged over the connected components (8-connectivity, per image) of the
    masks; FPR is over all normal pixels of all images. NaN if there are no anomalous
    (or no normal) pixels.
    """
    _check_fpr_limit(fpr_limit)
    return aupro_of(pixel_curves(maps, masks), fpr_limit)


def aupro_of(curves: PixelCurves | None, fpr_limit: float) -> float:
    if curves is None:
        return math.nan
    return min(max(area_up_to(curves.fpr, curves.pro, fpr_limit), 0.0), 1.0)  # clip float round-off


def compute_metrics(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    pred_image_labels: torch.Tensor,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    pred_masks: torch.Tensor | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Metrics of one test set as fractions in [0, 1] (NaN when undefined, e.g. one class only).

    ``image_AUROC`` and ``image_F1`` always; ``pixel_AUROC``, ``pixel_AUPRO`` and ``pixel_F1``
    only when ``masks`` are given (then ``maps`` and ``pred_masks`` are required). Pixel
    AUROC is exact (the sorted sweep of :func:`pixel_curves`, no threshold binning).
    """
    results = image_metrics(image_scores, image_labels, pred_image_labels)
    if masks is None:
        return results
    if maps is None or pred_masks is None:
        raise ValueError("pixel metrics need maps and pred_masks along with masks")
    _check_fpr_limit(fpr_limit)
    curves = pixel_curves(maps, masks)
    results["pixel_AUROC"] = math.nan if curves is None else float(torch.trapezoid(curves.tpr, curves.fpr))
    results["pixel_AUPRO"] = aupro_of(curves, fpr_limit)
    results["pixel_F1"] = f1(pred_masks, masks)
    return results
