"""Overlay pictures that explain themselves: one drawing for a run's test images (RUN_DIR/overlays/)
and for the new images predict scores (OUTPUT/overlays/).

A header says the image score against the image threshold and the label it gives (for a run's test
images also the ground truth and whether that is a detection, a miss or a false alarm), what the
outline shows, and why the image was chosen. Three panels at the image's own aspect ratio: the image
(ground truth outlined green when known) | the normalised map over the image, the pixels at or above
the pixel threshold (the predicted anomalous region) outlined white, a colour bar below | a crop
around the worst spot at the image's own resolution, where a defect of a few pixels is still visible.
The worst spot is the least-detected ground-truth region of a defective image (the largest region
when all are found), else the map's peak.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from tiled_hydra.core.postprocess import Postprocessor  # noqa: E402
from tiled_hydra.data.base import Split  # noqa: E402
from tiled_hydra.data.images import read_image, read_mask  # noqa: E402
from tiled_hydra.errors import DataError  # noqa: E402
from tiled_hydra.reporting.maps import at_size  # noqa: E402

PANEL_LONG_SIDE = 480  # px of the full views in the saved figure (at dpi 100)
CROP_SIDE = 96  # native px around the worst spot: a 5 px defect covers ~5 % of the crop's width
MIN_CROP_PANEL = 240  # px: the crop panel stays readable beside the thin full views of a very wide image
PNG_COMPRESS_LEVEL = 1  # zlib 1, not PIL's 6: ~0.1-0.25 s less per figure (of ~1 s), files ~15 % larger

# How the normalised map (0.5 = the pixel threshold) is painted over the image. Below the threshold:
# one cool blue whose opacity grows with the square of the value, from 0 (image untouched) to
# BELOW_ALPHA just under the threshold: the bulk of a normal image stays visible, and a reader sees
# where the model came close without reading it as a finding. At and above: strong warm colours,
# orange to dark red, the only warm colours in the picture, with the outline on top.
# A jet scale over the whole range (the former overlays) paints 0.36 yellow, which reads as a
# detection; a diverging map centred at 0.5 would tint every normal image deep blue and hide it.
BELOW_RGB = np.array([30.0, 100.0, 235.0])
BELOW_ALPHA = 0.4
ABOVE_STOPS = np.array([0.5, 0.75, 1.0])
ABOVE_RGB = np.array([[255.0, 150.0, 0.0], [225.0, 20.0, 0.0], [130.0, 0.0, 70.0]])
ABOVE_ALPHA = 0.7
TRUTH_COLOR = "lime"
PREDICTION_COLOR = "white"
PEAK_COLOR = "magenta"
CROP_BOX_COLOR = "cyan"
_HALO = [patheffects.withStroke(linewidth=3.0, foreground="black")]  # outlines stay visible on any image


# -- what the picture says ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """The facts about one image that its picture states."""

    score: float  # raw image score
    image_threshold: float
    pixel_threshold: float  # raw map value
    area_px: int  # pixels of the map at the image's own size at or above the pixel threshold
    image_px: int
    peak: float  # highest value of the normalised map (0.5 = pixel threshold)
    label: int | None = None  # ground truth (1 = defective), None when unknown (predict)
    defect_type: str | None = None

    @property
    def flagged(self) -> bool:
        return self.score >= self.image_threshold  # as Postprocessor.predict


@dataclass(frozen=True)
class Explanation:
    headline: str  # score vs. image threshold -> label (and ground truth)
    region: str  # what is outlined, or why nothing is
    mark_peak: bool  # flagged with no pixel above the pixel threshold: the map's peak is marked
    alarm: bool  # the headline's colour: red for an anomalous label, blue for a normal one (as the map's)


def compared(score: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 4 significant digits, more when needed to show that they differ."""
    for digits in range(4, 10):
        a, b = f"{score:.{digits}g}", f"{threshold:.{digits}g}"
        if a != b or score == threshold:
            break
    return a, b


OUTCOMES = {(1, True): "labelled anomalous (detected)", (1, False): "labelled normal (missed)",
            (0, True): "labelled anomalous (false alarm)", (0, False): "labelled normal (correct)"}


def explain(v: Verdict) -> Explanation:
    """The header text of ``v``'s picture."""
    score, threshold = compared(v.score, v.image_threshold)
    relation = f"image score {score} {'≥' if v.flagged else '<'} image threshold {threshold}"
    if v.label is None:
        headline = f"labelled {'anomalous' if v.flagged else 'normal'}: {relation}"
    else:
        truth = "normal image" if not v.label else f"defective image ({v.defect_type})" if v.defect_type else "defective image"
        headline = f"{truth}, {relation}: {OUTCOMES[(int(bool(v.label)), v.flagged)]}"
    pixel_threshold = f"the pixel threshold {v.pixel_threshold:.4g}"
    peak = f"{math.floor(v.peak * 100) / 100:.2f}"  # rounded down: a peak just below 0.5 never reads "0.50"
    if v.area_px:
        share = 100 * v.area_px / max(v.image_px, 1)
        region = f"white outline: {v.area_px:,} px ({share:.2g} % of the image) at or above {pixel_threshold}"
        if not v.flagged:
            region += ", yet the image is labelled normal: the label comes from the image score alone"
    elif v.flagged:
        region = (f"labelled anomalous by its image score alone; no pixel above {pixel_threshold} "
                  f"(normalised map peak {peak} < 0.5, circled)")
    else:
        region = f"no pixel above {pixel_threshold} (normalised map peak {peak} < 0.5): nothing outlined"
    return Explanation(headline, region, mark_peak=v.flagged and not v.area_px, alarm=v.flagged)


# -- drawing -------------------------------------------------------------------------------------------
def paint(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``image`` (h, w, 3) uint8 with the normalised map ``heat`` (h, w) painted over it (see the colour
    scale above)."""
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)[..., None]
    above = heat >= 0.5
    warm = np.stack([np.interp(heat[..., 0], ABOVE_STOPS, ABOVE_RGB[:, c]) for c in range(3)], -1)
    rgb = np.where(above, warm, BELOW_RGB)
    alpha = np.where(above, ABOVE_ALPHA, BELOW_ALPHA * (heat / 0.5) ** 2)
    return (image * (1 - alpha) + rgb * alpha).round().astype(np.uint8)


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


def outline(ax, mask: np.ndarray | None, color: str, offset: tuple[int, int] = (0, 0), **style) -> None:
    """The boundary of ``mask`` (closed also where it touches the border). Traced inside the mask's
    bounding box only: a small region of a 1200x800 image costs its own size, not the image's."""
    if mask is None or not mask.any():
        return
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.pad(mask[r0:r1, c0:c1], 1).astype(np.float32)  # a False rim closes regions at the border
    ys = np.arange(r0 - 1, r1 + 1) + offset[0]
    xs = np.arange(c0 - 1, c1 + 1) + offset[1]
    lines = ax.contour(xs, ys, box, levels=[0.5], colors=color, linewidths=1.2, **style)
    lines.set_path_effects(_HALO)


# Header lines: (font size, weight, colour, px per character of DejaVu Sans (measured, a little high
# so that wrapped lines never run off the figure), line height px).
HEADLINE = (11, "bold", None, 8.8, 20)
REGION = (9.5, "normal", "black", 6.8, 17)
NOTE = (8.5, "normal", "#444444", 6.0, 15)
TITLE_PX_PER_CHAR, TITLE_LINE = 5.6, 11  # panel titles, 8 pt
MIN_FIGURE_WIDTH = 1000  # px: a portrait image's figure keeps room for the header


def wrap(text: str, px: float, px_per_char: float) -> list[str]:
    """``text`` (its own lines kept) wrapped at word boundaries to fit ``px`` pixels."""
    width = max(10, int(px / px_per_char))
    return [line for part in text.split("\n") for line in (textwrap.wrap(part, width) or [""])]


@dataclass(frozen=True)
class Layout:
    """Where everything goes, in px of the saved figure (dpi 100): the header lines, then three panels
    side by side (titles above, the colour bar below the middle one)."""

    width: int  # of each full view; its height keeps the image's aspect ratio
    height: int
    crop: int  # side of the square crop panel
    figure_width: int
    header: list[tuple[list[str], tuple]]  # wrapped lines and their style
    titles: list[list[str]]  # wrapped, per panel
    pad: int = 12
    bar: int = 62

    @classmethod
    def of(cls, size: tuple[int, int], header: list[tuple[str, tuple]], titles: list[str], pad: int = 12) -> "Layout":
        scale = PANEL_LONG_SIDE / max(size)
        width, height = round(size[1] * scale), round(size[0] * scale)
        crop = max(height, MIN_CROP_PANEL)
        figure_width = max(4 * pad + 2 * width + crop, MIN_FIGURE_WIDTH)
        wrapped = [(wrap(text, figure_width - 2 * pad, style[3]), style) for text, style in header]
        titled = [wrap(t, w + pad, TITLE_PX_PER_CHAR) for t, w in zip(titles, (width, width, crop))]
        return cls(width, height, crop, figure_width, wrapped, titled, pad)

    @property
    def header_height(self) -> int:
        return 18 + sum(len(lines) * style[4] for lines, style in self.header)

    @property
    def figure(self) -> tuple[int, int]:
        title = TITLE_LINE * max(len(t) for t in self.titles) + 10
        return self.figure_width, self.header_height + title + max(self.height, self.crop) + self.bar

    def panel(self, k: int) -> tuple[float, float, float, float]:
        """(x, y, w, h) of panel k (0, 1: full views, 2: crop) from the figure's bottom-left corner."""
        x = (k + 1) * self.pad + k * self.width
        w, h = (self.crop, self.crop) if k == 2 else (self.width, self.height)
        return x, self.bar + (max(self.height, self.crop) - h) / 2, w, h

    def axes(self, fig: Figure, box: tuple[float, float, float, float], frame: bool = False):
        w, h = self.figure
        ax = fig.add_axes((box[0] / w, box[1] / h, box[2] / w, box[3] / h))
        if not frame:
            ax.set_axis_off()
        return ax

    def text(self, fig: Figure, x: float, y: float, text: str, **style) -> None:
        """``text`` at (x, y) px from the figure's bottom-left corner."""
        w, h = self.figure
        fig.text(x / w, y / h, text, **style)


def header(fig: Figure, layout: Layout, alarm: bool) -> None:
    y = layout.figure[1] - 8
    for lines, (size, weight, colour, _, line_height) in layout.header:
        colour = colour or ("#b00000" if alarm else "#1a3c8c")  # the headline: red anomalous, blue normal
        for line in lines:
            layout.text(fig, layout.pad, y, line, fontsize=size, weight=weight, color=colour, va="top")
            y -= line_height


def panel_titles(fig: Figure, layout: Layout) -> None:
    """Titles as figure text: an axes title costs each draw a layout pass over its (hidden) ticks."""
    for k, lines in enumerate(layout.titles):
        x, y, w, h = layout.panel(k)
        layout.text(fig, x + w / 2, y + h + 5, "\n".join(lines), fontsize=8, ha="center", va="bottom")


def colour_bar(fig: Figure, layout: Layout) -> None:
    """The normalised scale 0..1 as painted over a mid-grey pixel, the pixel threshold marked."""
    x, _, w, _ = layout.panel(1)
    bar_width = max(0.8 * w, 380)  # room for its two labels beside a narrow (portrait) panel
    ax = layout.axes(fig, (max(layout.pad, x + (w - bar_width) / 2), 30, bar_width, 12), frame=True)
    ramp = paint(np.full((1, 256, 3), 128.0), np.linspace(0, 1, 256)[None])
    ax.imshow(ramp, extent=(0, 1, 0, 1), aspect="auto", interpolation="nearest")
    ax.axvline(0.5, color="black", linewidth=2)
    ax.set_yticks([])
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "0.25", "0.5", "0.75", "1"], fontsize=7)
    ax.tick_params(length=2, pad=1)
    ax.text(0.25, 1.15, "below the pixel threshold", ha="center", va="bottom", fontsize=7, transform=ax.transAxes)
    ax.text(0.75, 1.15, "anomalous pixels (outlined)", ha="center", va="bottom", fontsize=7, transform=ax.transAxes)
    ax.set_xlabel("normalised anomaly map (0.5 = pixel threshold)", fontsize=7, labelpad=1)


def mark(ax, point: tuple[int, int], size: float) -> None:
    ax.plot([point[1]], [point[0]], marker="o", markersize=size, markerfacecolor="none", markeredgecolor=PEAK_COLOR,
            markeredgewidth=2, path_effects=_HALO)


def draw_overlay(path: Path, image: np.ndarray, heat: np.ndarray, prediction: np.ndarray, explanation: Explanation,
                 note: str, mask: np.ndarray | None = None) -> Path:
    """The picture of one image (module doc), all arrays at the image's own size: ``image`` (H, W, 3)
    uint8, ``heat`` the normalised map (0.5 = pixel threshold), ``prediction`` its anomalous pixels
    (raw map >= pixel threshold), ``mask`` the ground truth when known; ``note`` is the header's last
    line (which image, why chosen)."""
    size = image.shape[:2]
    truth = mask is not None and bool(mask.any())
    peak = np.unravel_index(int(np.argmax(heat)), size)
    rows, cols = crop_box(worst_spot(heat, mask, prediction), size, CROP_SIDE)
    legend = ["green dashed: true defect"] * truth + ["magenta circle: the map's peak"] * explanation.mark_peak
    around = "the least-detected true defect" if truth else "the map's peak"  # as worst_spot
    layout = Layout.of(size, [(explanation.headline, HEADLINE), (explanation.region, REGION), (note, NOTE)], [
        "image" + (", true defect outlined green" if truth else ""),
        "\n".join(["anomaly map; white outline: pixels at or above the pixel threshold", *(["; ".join(legend)] if legend else [])]),
        f"cyan box at full resolution ({rows.stop - rows.start} x {cols.stop - cols.start} px)\naround {around}",
    ])
    fig = Figure(figsize=(layout.figure[0] / 100, layout.figure[1] / 100), dpi=100)
    header(fig, layout, explanation.alarm)
    # The full views are drawn from copies at the panel's own pixel size (placed at native
    # coordinates, so the native outlines and the crop box align): matplotlib would otherwise
    # resample the native arrays on every draw, ~4x the time for a 1200x800 image.
    shown, shown_heat, extent = display_copies(image, heat, (layout.height, layout.width))
    left = layout.axes(fig, layout.panel(0))
    left.imshow(shown, extent=extent, interpolation="nearest")
    outline(left, mask, TRUTH_COLOR)
    middle = layout.axes(fig, layout.panel(1))
    middle.imshow(paint(shown, shown_heat), extent=extent, interpolation="nearest")
    outline(middle, mask, TRUTH_COLOR, linestyles="dashed")
    outline(middle, prediction, PREDICTION_COLOR)
    middle.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start, rows.stop - rows.start,
                               fill=False, edgecolor=CROP_BOX_COLOR, linewidth=1, linestyle="--"))
    if explanation.mark_peak:
        mark(middle, peak, 14)
    middle.set_xlim(extent[0], extent[1])
    middle.set_ylim(extent[2], extent[3])
    right = layout.axes(fig, layout.panel(2))
    crop_extent = (cols.start - 0.5, cols.stop - 0.5, rows.stop - 0.5, rows.start - 0.5)
    right.imshow(paint(image[rows, cols], heat[rows, cols]), extent=crop_extent, interpolation="nearest")
    outline(right, None if mask is None else mask[rows, cols], TRUTH_COLOR, (rows.start, cols.start), linestyles="dashed")
    outline(right, prediction[rows, cols], PREDICTION_COLOR, (rows.start, cols.start))
    if explanation.mark_peak and rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop:
        mark(right, peak, 18)
    right.set_xlim(crop_extent[0], crop_extent[1])
    right.set_ylim(crop_extent[2], crop_extent[3])
    panel_titles(fig, layout)
    colour_bar(fig, layout)
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return Path(path)


# -- a run's test images ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pick:
    index: int
    tag: str  # the file name's first part: why the image was chosen, true of this image
    rank: int  # 1 = the first by the tag's ordering
    reason: str  # the same, for the header


def nth(rank: int, what: str) -> str:
    """(1, "highest-scored") -> "the highest-scored"; (2, ...) -> "the 2nd highest-scored"."""
    if rank == 1:
        return f"the {what}"
    suffix = "th" if 11 <= rank % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(rank % 10, "th")
    return f"the {rank}{suffix} {what}"


def short_path(path: str, limit: int = 70) -> str:
    """``path``, its leading folders replaced by "..." when it is longer than ``limit`` characters."""
    if len(path) <= limit:
        return path
    parts = Path(path).parts
    for start in range(1, len(parts)):
        shown = str(Path(*parts[start:]))
        if len(shown) + 4 <= limit or start == len(parts) - 1:
            return f".../{shown}"
    return path


def choose_overlays(scores: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, count: int) -> list[Pick]:
    """Up to ``count`` test images: the highest-scored defective ones (half), the lowest-scored defective
    ones (a quarter) and the highest-scored normal ones (a quarter), at least one of each when there is
    one. Each tag is true of its image against its own image threshold ``thresholds[i]``: a defective
    image is ``defective_below_image_threshold`` (missed) only when its score is below the threshold,
    else ``lowest_scored_defective``; a normal one ``normal_above_image_threshold`` (a false alarm) only
    when its score is at or above it, else ``highest_scored_normal``."""
    picks: list[Pick] = []
    defective = torch.nonzero(labels == 1).flatten()
    normal = torch.nonzero(labels == 0).flatten()
    n_def, n_norm = len(defective), len(normal)
    if n_def:
        order = defective[scores[defective].argsort(descending=True, stable=True)]
        for rank, i in enumerate(order[: max(1, count // 2)].tolist(), 1):
            picks.append(Pick(i, "highest_scored_defective", rank,
                              f"{nth(rank, 'highest-scored')} of {n_def} defective test images"))
        for rank, i in enumerate(order.flip(0)[: max(1, count // 4)].tolist(), 1):
            below = bool(scores[i] < thresholds[i])
            picks.append(Pick(i, "defective_below_image_threshold" if below else "lowest_scored_defective", rank,
                              f"{nth(rank, 'lowest-scored')} of {n_def} defective test images, "
                              + ("below the image threshold: missed" if below else "at or above the image threshold")))
    if n_norm:
        order = normal[scores[normal].argsort(descending=True, stable=True)]
        for rank, i in enumerate(order[: max(1, count // 4)].tolist(), 1):
            above = bool(scores[i] >= thresholds[i])
            picks.append(Pick(i, "normal_above_image_threshold" if above else "highest_scored_normal", rank,
                              f"{nth(rank, 'highest-scored')} of {n_norm} normal test images, "
                              + ("at or above the image threshold: a false alarm" if above else "below the image threshold")))
    seen, unique = set(), []
    for pick in picks:
        if pick.index not in seen:
            seen.add(pick.index)
            unique.append(pick)
    return unique[:count]


def verdict_of(score: float, post: Postprocessor, own_map: torch.Tensor, label: int | None = None,
               defect_type: str | None = None) -> tuple[Verdict, np.ndarray, np.ndarray]:
    """The verdict of one image from its raw map at its own size, the normalised map and the prediction."""
    prediction = (own_map >= post.pixel_threshold).numpy()
    heat = post.normalize_maps(own_map).numpy()
    verdict = Verdict(score=float(score), image_threshold=post.image_threshold, pixel_threshold=post.pixel_threshold,
                      area_px=int(prediction.sum()), image_px=int(prediction.size), peak=float(heat.max()), label=label,
                      defect_type=defect_type)
    return verdict, heat, prediction


def write_overlays(run_dir: Path, test: Split, scores: torch.Tensor, maps: torch.Tensor, scoring: Sequence[Postprocessor],
                   overlays: int) -> list[Path]:
    """RUN_DIR/overlays/TAG_RANK_KIND_NAME.png for the test images :func:`choose_overlays` picks, in place
    of the overlays of an earlier evaluation (whose names may no longer be true). ``maps``: the raw maps
    at the setup's size; ``scoring[i]``: the postprocessor that labelled image i."""
    overlay_dir = Path(run_dir) / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    for earlier in overlay_dir.glob("*.png"):
        earlier.unlink()
    thresholds = torch.tensor([post.image_threshold for post in scoring], dtype=scores.dtype)
    written = []
    for pick in choose_overlays(scores, test.labels, thresholds, overlays):
        i = pick.index
        name = Path(test.paths[i]).stem if test.paths else str(i)
        kind = test.defect_types[i] if test.defect_types else ("defect" if test.labels[i] else "good")
        image, mask = native_view(test, i)
        defect_type = test.defect_types[i] if test.defect_types and test.labels[i] else None
        verdict, heat, prediction = verdict_of(float(scores[i]), scoring[i], at_size(maps[i], image.shape[:2]),
                                               int(test.labels[i]), defect_type)
        path = overlay_dir / f"{pick.tag}_{pick.rank}_{kind}_{name}.png"
        shown = short_path(test.paths[i]) if test.paths else f"test image {i}"
        draw_overlay(path, image, heat, prediction, explain(verdict), f"{shown}  |  shown as {pick.reason}", mask)
        written.append(path)
    return written
