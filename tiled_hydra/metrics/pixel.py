"""Pixel metrics at one resolution for every setup, so that setups are graded on the same ground truth.

``metrics.resolution`` chooses where the merged maps are compared with the masks:

- ``setup``: the setup's own image size, masks resized with nearest neighbour (the paper's and
  anomalib's convention; downsizing can erase a small defect's mask while its image stays anomalous);
- ``native``: each test image's own size: the map is upsampled (bilinear) and compared with the
  original mask file;
- ``INT`` or ``[H, W]``: one common size: maps bilinear, original masks nearest neighbour;
- ``auto`` (default): ``native`` when all test images share one size, else ``metrics.fallback_resolution``.

Memory stays bounded. Up to ``EXACT_PIXEL_LIMIT`` evaluated pixels the curves are exact (one sort over
every pixel, :mod:`tiled_hydra.metrics.curves`). Beyond it, images are streamed one at a time into
histograms over ``STREAM_THRESHOLDS`` thresholds (quantiles of a sample of the evaluated values):
every curve point is exact at its threshold, only the set of thresholds is limited (results say
``pixel_thresholds``).

Beside the paper's metrics: ``pixel_AUPRO_05`` (FPR limit 0.05), pixel average precision, and the
recall of ground-truth regions by size, in two views:

- ``region_recall_at_fpr``: at fixed pixel false-positive rates (``metrics.region_fprs``) on the test
  set's normal pixels, the operating points of a recall-at-FPR curve (see :func:`fpr_thresholds`);
  what ``compare`` shows by default, since it means the same on weak and strong maps;
- ``region_recall_by_size``: at the pixel threshold fitted on validation data (named in
  ``region_recall_threshold``); on a weak map that threshold can flood the image or find nothing.

A region is detected when at least ``region_overlap`` of its pixels are positive.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from tiled_hydra.data.base import Split
from tiled_hydra.data.images import read_mask, resize_mask
from tiled_hydra.errors import ConfigError
from tiled_hydra.metrics.curves import PixelCurves, aupro_of, average_precision, region_curves

EXACT_PIXEL_LIMIT = 2**25  # ~1.3 GB for the exact sort (values, order, region ids)
STREAM_THRESHOLDS = 2**16
PER_IMAGE_THRESHOLDS = 1024  # per-image histograms kept for bootstrap intervals over test images (compare)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# -- where to evaluate ------------------------------------------------------------------------------
def resolve_resolution(setting, split: Split, fallback) -> tuple[str, tuple[int, int] | None]:
    """``metrics.resolution`` -> ("setup", None) | ("native", None) | ("fixed", (H, W))."""
    if isinstance(setting, str) and setting in ("setup", "native", "auto"):
        if setting == "setup":
            return "setup", None
        known = len(split.native_sizes) == len(split) and len(split.mask_paths) == len(split)
        if setting == "native" and not known:
            raise ConfigError("metrics.resolution=native: this dataset does not record its images' own sizes; use setup")
        if setting == "native" or (known and len(set(split.native_sizes)) == 1):
            return "native", None
        if not known:
            return "setup", None
        return "fixed", parse_size(fallback, "metrics.fallback_resolution")
    return "fixed", parse_size(setting, "metrics.resolution")


def parse_size(value, key: str) -> tuple[int, int]:
    """A positive int or [height, width] of positive ints."""

    def positive(v) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError
        return int(v)

    try:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return positive(value), positive(value)
        height, width = (positive(v) for v in value)
        return height, width
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be setup, native, auto, a positive int or [height, width]; got {value!r}") from None


def describe(mode: str, size: tuple[int, int] | None) -> str:
    return mode if size is None else f"{size[0]}x{size[1]}"


# -- one test image at the evaluation resolution -----------------------------------------------------
def ground_truth(split: Split, index: int, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Bool mask of test image ``index`` at the evaluation resolution."""
    if mode == "setup":
        return split.masks[index].numpy()
    path = split.mask_paths[index]
    mask = read_mask(Path(path)) if path else np.zeros(split.native_sizes[index], dtype=bool)
    return mask if mode == "native" else resize_mask(mask, size)


def map_at(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) map -> (H, W), bilinear as the images were resized (PIL bilinear, half-pixel centres)."""
    if tuple(anomaly_map.shape) == tuple(size):
        return anomaly_map.float()
    return F.interpolate(anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


# -- region recall by size ---------------------------------------------------------------------------
def size_bin_labels(edges: list[float]) -> list[str]:
    """[1e-4, 1e-3, 1e-2] -> ['<0.01%', '0.01-0.1%', '0.1-1%', '>=1%'] (share of the image area)."""
    pct = [f"{100 * e:g}" for e in edges]
    return [f"<{pct[0]}%"] + [f"{a}-{b}%" for a, b in zip(pct[:-1], pct[1:])] + [f">={pct[-1]}%"]


#: pixel false-positive rates of ``region_recall_at_fpr`` when ``metrics.region_fprs`` is not set
REGION_FPRS = (0.01, 0.05)


def region_fprs(metrics_cfg) -> list[float]:
    """``metrics.region_fprs``: rates in (0, 1), one-line ConfigError otherwise."""
    values = getattr(metrics_cfg, "region_fprs", None)
    values = list(REGION_FPRS if values is None else values)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values):
        raise ConfigError(f"metrics.region_fprs={values}: expected pixel false-positive rates in (0, 1), e.g. [0.01, 0.05]")
    return [float(v) for v in values]


def region_scores(values: np.ndarray, regions: np.ndarray, sizes: np.ndarray, overlap: float) -> np.ndarray:
    """Per region 1..n of one image, the score s such that the region is detected at a threshold t
    (pixels with value > t positive) exactly when s > t: the k-th largest value of its pixels,
    k = ceil(overlap x size) (+inf when k = 0).  One number per region answers every threshold."""
    count = len(sizes) - 1
    if count == 0:
        return np.zeros(0, dtype=np.float64)
    flat, inside = values.reshape(-1), regions.reshape(-1) > 0
    region, value = regions.reshape(-1)[inside], flat[inside].astype(np.float64)
    order = np.lexsort((-value, region))  # by region, then value descending
    value = value[order]
    starts = np.searchsorted(region[order], np.arange(1, count + 1))
    k = np.ceil(overlap * sizes[1:]).astype(np.int64)  # the float product, as in RegionTally.add
    return np.where(k > 0, value[starts + np.maximum(k, 1) - 1], math.inf)


def allowed_false_positives(f: float, n: int) -> int:
    return math.floor(f * n + 1e-9)  # 1e-9: 0.29 x 100 is 28.999999999999996 in floating point


def fpr_thresholds(normal_values: torch.Tensor, fprs: list[float]) -> dict[float, float]:
    """{f: t_f}: t_f is the value above which (strictly) at most the share f of the given normal
    pixels lie: the (m + 1)-th largest normal value, m = floor(f N).  ``normal_values`` are the TEST
    set's normal pixels: the threshold is chosen on the evaluated data, as a point of a recall-at-FPR
    curve is (AUPRO's FPR axis is defined the same way); it is an operating point for comparing maps,
    not a threshold fitted for deployment.  NaN without normal pixels."""
    n = normal_values.numel()
    if n == 0:
        return {f: math.nan for f in fprs}
    values = normal_values.double()
    out = {}
    for f in fprs:
        m = allowed_false_positives(f, n)
        out[f] = -math.inf if m >= n else float(torch.kthvalue(values, n - m).values)
    return out


def streamed_fpr_thresholds(edges: torch.Tensor, normal: torch.Tensor, fprs: list[float]) -> dict[float, float]:
    """:func:`fpr_thresholds` from the streamed histogram of normal pixels (``normal[k]`` = pixels in
    [edges[k], edges[k+1])): the lowest streamed threshold with at most f N normal pixels at or above
    it, returned just below it so that "value > t" means "value >= that edge"."""
    n = int(normal.sum())
    at_or_above = normal.flip(0).cumsum(0).flip(0)
    out = {}
    for f in fprs:
        allowed = torch.nonzero(at_or_above <= allowed_false_positives(f, n)).reshape(-1)
        if n == 0:
            out[f] = math.nan
        elif len(allowed) == 0:  # the top streamed bin alone holds more: the finest threshold there is
            out[f] = float(edges[-1])
        else:
            out[f] = float(np.nextafter(float(edges[int(allowed[0])]), -math.inf))
    return out


@dataclass
class RegionTally:
    """Ground-truth regions per size bin: how many were detected at the thresholded view's threshold,
    and each region's score (:func:`region_scores`) for the views at fixed false-positive rates."""

    edges: list[float]
    detected: list[int] = field(default_factory=list)
    total: list[int] = field(default_factory=list)
    bins: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.detected = [0] * (len(self.edges) + 1)
        self.total = [0] * (len(self.edges) + 1)

    def add(self, sizes: np.ndarray, hits: np.ndarray, area: int, overlap: float, scores: np.ndarray | None = None) -> None:
        """sizes/hits of regions 1..n of one image: pixels, and pixels at or above the threshold;
        ``scores``: their :func:`region_scores`."""
        bins = np.searchsorted(self.edges, sizes / area, side="right")
        for b, detected in zip(bins, hits >= overlap * sizes):
            self.total[b] += 1
            self.detected[b] += int(detected)
        if scores is not None:
            self.bins.append(bins)
            self.scores.append(np.asarray(scores, dtype=np.float64))

    def recall(self) -> dict[str, float]:
        return {label: (d / t if t else math.nan) for label, d, t in zip(size_bin_labels(self.edges), self.detected, self.total)}

    def counts(self) -> dict[str, int]:
        return dict(zip(size_bin_labels(self.edges), self.total))

    def recall_above(self, threshold: float) -> dict[str, float]:
        """Recall per size bin when pixels with value > ``threshold`` are positive (NaN: no region, or no threshold)."""
        bins = np.concatenate(self.bins) if self.bins else np.zeros(0, dtype=np.int64)
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        detected = np.bincount(bins[scores > threshold], minlength=len(self.edges) + 1)
        return {label: (float(d / t) if t and not math.isnan(threshold) else math.nan)
                for label, d, t in zip(size_bin_labels(self.edges), detected, self.total)}

    def recall_at_fpr(self, thresholds: dict[float, float]) -> dict[str, dict[str, float]]:
        """{'0.01': {size bin: recall}, ...} at the thresholds of :func:`fpr_thresholds`."""
        return {f"{f:g}": self.recall_above(t) for f, t in thresholds.items()}


def describe_thresholds(pixel_thresholds: torch.Tensor) -> str:
    """The thresholded view's threshold(s), as results.json names them."""
    distinct = sorted({float(t) for t in pixel_thresholds.reshape(-1)})
    if len(distinct) == 1:
        return f"validation-fitted pixel threshold {distinct[0]:.6g}"
    return f"validation-fitted pixel thresholds per fold: {', '.join(f'{t:.6g}' for t in distinct)}"


# -- curves streamed into histograms -----------------------------------------------------------------
def threshold_edges(maps: torch.Tensor, shapes: list[tuple[int, int]], count: int = STREAM_THRESHOLDS) -> torch.Tensor:
    """Ascending thresholds: -inf, then the distinct evaluated (upsampled) values, from a seeded sample
    of at most 2^22 of them taken image by image; their quantiles when there are more than ``count``."""
    generator = torch.Generator().manual_seed(0)
    per_image = max(1, 2**22 // len(maps))
    samples = []
    for anomaly_map, shape in zip(maps, shapes):
        values = map_at(anomaly_map, shape).reshape(-1)
        if values.numel() > per_image:
            values = values[torch.randint(values.numel(), (per_image,), generator=generator)]
        samples.append(values.double())
    ordered = torch.cat(samples).sort().values
    distinct = torch.unique_consecutive(ordered)
    if distinct.numel() > count - 1:  # quantiles: equal pixel mass between thresholds
        distinct = torch.unique_consecutive(ordered[torch.linspace(0, ordered.numel() - 1, count - 1).round().long()])
    return torch.cat([torch.tensor([-math.inf], dtype=torch.float64), distinct])


def coarse_groups(num_edges: int, count: int) -> np.ndarray:
    """Indices of about ``count`` of ``num_edges`` ascending thresholds, evenly spaced, the first (-inf)
    included: the coarse bin k is the union of the fine bins groups[k] .. groups[k+1] - 1."""
    return np.unique(np.linspace(0, num_edges - 1, min(count, num_edges)).round().astype(np.int64))


@dataclass
class CurveHistograms:
    edges: torch.Tensor
    normal: torch.Tensor = None
    anomalous: torch.Tensor = None
    pro: torch.Tensor = None  # sum over anomalous pixels of 1 / |their region|
    num_regions: int = 0

    def __post_init__(self) -> None:
        k = len(self.edges)
        self.normal, self.anomalous = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        self.pro = torch.zeros(k, dtype=torch.float64)

    def bin_image(self, values: torch.Tensor, regions: np.ndarray, region_sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        """One image's own (normal, anomalous, pro) histograms; reads nothing that :meth:`add` changes."""
        bins = (torch.searchsorted(self.edges, values.reshape(-1).double(), right=True) - 1).numpy()
        region_of = regions.reshape(-1)
        inside = region_of > 0
        k = len(self.edges)
        normal = np.bincount(bins[~inside], minlength=k).astype(np.float64)
        anomalous = np.bincount(bins[inside], minlength=k).astype(np.float64)
        pro = np.bincount(bins[inside], weights=1.0 / region_sizes[region_of[inside]], minlength=k)
        return normal, anomalous, pro

    def add(self, values: torch.Tensor, regions: np.ndarray, region_sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        """Add one image; returns its own (normal, anomalous, pro) histograms."""
        return self.accumulate(*self.bin_image(values, regions, region_sizes), num_regions=len(region_sizes) - 1)

    def accumulate(self, normal: np.ndarray, anomalous: np.ndarray, pro: np.ndarray, num_regions: int) -> tuple[np.ndarray, ...]:
        self.normal += torch.from_numpy(normal)
        self.anomalous += torch.from_numpy(anomalous)
        self.pro += torch.from_numpy(pro)
        self.num_regions += num_regions
        return normal, anomalous, pro

    def curves(self) -> PixelCurves | None:
        num_normal, num_anomalous = int(self.normal.sum()), int(self.anomalous.sum())
        if num_normal == 0 or num_anomalous == 0:
            return None
        zero = torch.zeros(1, dtype=torch.float64)  # highest threshold first: cumulative from the top bin
        return PixelCurves(
            fpr=torch.cat([zero, self.normal.flip(0).cumsum(0) / num_normal]),
            tpr=torch.cat([zero, self.anomalous.flip(0).cumsum(0) / num_anomalous]),
            pro=torch.cat([zero, self.pro.flip(0).cumsum(0) / self.num_regions]),
            num_normal=num_normal,
            num_anomalous=num_anomalous,
        )


def ordered_map(work, items, workers: int):
    """``work(item)`` for each item, on ``workers`` threads, yielded in the items' order; at most
    2 x workers results wait, so memory stays that of a few items."""
    items = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(work, item) for item in islice(items, 2 * workers))
        while pending:
            result = pending.popleft().result()
            for item in islice(items, 1):
                pending.append(pool.submit(work, item))
            yield result


# -- the metrics ---------------------------------------------------------------------------------------
def pixel_metrics(maps: torch.Tensor, split: Split, pixel_thresholds: torch.Tensor, metrics_cfg,
                  per_image: dict | None = None, progress: bool = False) -> dict:
    """Pixel metrics of merged maps (N, h, w) against ``split``'s ground truth at ``metrics_cfg.resolution``.

    ``pixel_thresholds`` (N,): the threshold fitted on data other than each image (one value with a
    validation split; per fold when cross-fitted). ``per_image``, when given, receives every image's
    histograms over PER_IMAGE_THRESHOLDS thresholds (``edges``, ``normal``, ``anomalous``, ``pro``
    (N, K) and ``regions`` (N,)): enough to recompute the curves on any resample of the images.
    """
    mode, size = resolve_resolution(metrics_cfg.resolution, split, metrics_cfg.fallback_resolution)
    overlap = float(metrics_cfg.region_overlap)
    tally = RegionTally([float(e) for e in metrics_cfg.region_size_bins])
    fprs = region_fprs(metrics_cfg)
    shapes = [tuple(maps.shape[-2:]) if mode == "setup" else (size or split.native_sizes[i]) for i in range(len(split))]
    exact = sum(h * w for h, w in shapes) <= EXACT_PIXEL_LIMIT
    histograms = None if exact else CurveHistograms(threshold_edges(maps, shapes, STREAM_THRESHOLDS))
    coarse, groups = None, None
    if per_image is not None and exact:
        coarse = CurveHistograms(threshold_edges(maps, shapes, PER_IMAGE_THRESHOLDS))
    elif per_image is not None:  # every k-th streamed threshold: an image's coarse bins are sums of its fine bins
        groups = coarse_groups(len(histograms.edges), PER_IMAGE_THRESHOLDS)
        coarse = CurveHistograms(histograms.edges[groups])
    coarse_rows = []
    values_all, regions_all, offset = [], [], 0
    true_pos = false_pos = false_neg = 0

    def image(i: int) -> dict:
        """What image i contributes, computed apart (on a thread) and added in image order."""
        mask = ground_truth(split, i, mode, size)
        values = map_at(maps[i], shapes[i])
        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        predicted = (values >= float(pixel_thresholds[i])).numpy()
        region_sizes = np.bincount(regions.reshape(-1), minlength=count + 1)
        out = dict(count=count, area=mask.size, region_sizes=region_sizes,
                   hits=np.bincount(regions[predicted], minlength=count + 1),
                   scores=region_scores(values.numpy(), regions, region_sizes, overlap),
                   confusion=(int((predicted & mask).sum()), int((predicted & ~mask).sum()), int((~predicted & mask).sum())))
        if exact:
            out.update(values=values.reshape(-1), regions=regions)
        else:
            out.update(fine=histograms.bin_image(values, regions, region_sizes.astype(np.float64)))
        if coarse is not None and groups is None:
            out.update(coarse=coarse.bin_image(values, regions, region_sizes.astype(np.float64)))
        return out

    # upsampling, labelling and binning release the GIL: two threads take ~half the time
    pieces = ordered_map(image, range(len(split)), workers=max(1, min(2, torch.get_num_threads())))
    for piece in tqdm(pieces, total=len(split), desc="pixel metrics", unit="img", disable=not progress, leave=False,
                      file=sys.stdout):
        count, region_sizes = piece["count"], piece["region_sizes"]
        true_pos, false_pos, false_neg = (a + b for a, b in zip((true_pos, false_pos, false_neg), piece["confusion"]))
        tally.add(region_sizes[1:], piece["hits"][1:], piece["area"], overlap, piece["scores"])
        if exact:
            regions = piece["regions"]
            values_all.append(piece["values"])
            regions_all.append(torch.from_numpy(np.where(regions > 0, regions + offset, 0).astype(np.int32).reshape(-1)))
            offset += count
        else:
            fine = histograms.accumulate(*piece["fine"], num_regions=count)
        if groups is not None:
            coarse_rows.append((*(np.add.reduceat(h, groups) for h in fine), count))
        elif coarse is not None:
            coarse_rows.append((*coarse.accumulate(*piece["coarse"], num_regions=count), count))
    if coarse is not None:
        normal, anomalous, pro, counts = zip(*coarse_rows)
        per_image.update(edges=coarse.edges.numpy(), normal=np.stack(normal), anomalous=np.stack(anomalous),
                         pro=np.stack(pro), regions=np.array(counts))
    if exact:
        values, regions = torch.cat(values_all), torch.cat(regions_all)
        del values_all, regions_all
        thresholds = fpr_thresholds(values[regions == 0], fprs)
        curves = region_curves(values, regions, offset)
        del values, regions
    else:
        thresholds = streamed_fpr_thresholds(histograms.edges, histograms.normal, fprs)
        curves = histograms.curves()
    f1_denominator = 2 * true_pos + false_pos + false_neg
    return {
        "pixel_AUROC": math.nan if curves is None else float(torch.trapezoid(curves.tpr, curves.fpr)),
        "pixel_AUPRO": aupro_of(curves, float(metrics_cfg.aupro_fpr_limit)),
        "pixel_AUPRO_05": aupro_of(curves, float(metrics_cfg.strict_fpr_limit)),
        "pixel_AP": average_precision(curves),
        "pixel_F1": 2 * true_pos / f1_denominator if f1_denominator else 0.0,
        "region_recall_by_size": tally.recall(),
        "region_recall_threshold": describe_thresholds(pixel_thresholds),
        "region_recall_at_fpr": tally.recall_at_fpr(thresholds),
        "region_count_by_size": tally.counts(),
        "metrics_resolution": describe(mode, size),
        "pixel_thresholds": "all" if exact else len(histograms.edges),
    }
