"""The results schema: every key of results.json, its meaning, its unit and its valid range.

The one list of metric names: the printed results table, the W&B summary, ``compare`` and the docs
read it from here, and every run checks its results against it before results.json is written
(:func:`check`), so a key that is misspelt, missing or out of range fails the run instead of
writing a file that cannot be true. Adding a metric = the function that computes it + one entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    key: str
    kind: str  # see KINDS
    meaning: str
    required: bool = True
    label: str | None = None  # row label in the printed results table; None: not printed


KINDS = {
    "fraction": "a number in [0, 1]; NaN when undefined (e.g. a test set without anomalous pixels)",
    "seconds": "seconds >= 0",
    "bytes": "bytes >= 0 (an integer)",
    "count": "an integer >= 0",
    "rate": "a number > 0",
    "ratio": "a number >= 0",
    "difference": "a real number (0: no difference; slightly negative within noise)",
    "ms": "milliseconds > 0",
    "text": "a string",
    "fraction_by_size": "{size bin: fraction or NaN}",
    "count_by_size": "{size bin: count}",
    "fraction_by_fpr_and_size": "{pixel false-positive rate: {size bin: fraction or NaN}}",
}

FIELDS = [
    # -- accuracy (fractions in [0, 1]) ----------------------------------------------------------------
    Field("image_AUROC", "fraction", "area under the ROC curve of image scores (paper 000 Table 1)", label="image AUROC"),
    Field("image_F1", "fraction", "F1 of image labels at the image threshold fitted on validation data", label="image F1"),
    Field("pixel_AUROC", "fraction", "area under the pixel ROC curve, every pixel of every test image", False, "pixel AUROC"),
    Field("pixel_AUPRO", "fraction", "area under the per-region overlap curve up to metrics.aupro_fpr_limit "
          "(0.3), divided by it (paper 000 Table 2)", False, "pixel AUPRO"),
    Field("pixel_AUPRO_05", "fraction", "pixel_AUPRO up to metrics.strict_fpr_limit (0.05)", False, "pixel AUPRO (FPR<=0.05)"),
    Field("pixel_AP", "fraction", "pixel average precision (scikit-learn's definition)", False, "pixel AP"),
    Field("pixel_F1", "fraction", "F1 of pixel labels at the pixel threshold fitted on validation data", False, "pixel F1"),
    Field("region_recall_by_size", "fraction_by_size", "share of ground-truth regions of each size bin with at least "
          "metrics.region_overlap of their pixels above the pixel threshold", False),
    Field("region_recall_threshold", "text", "the pixel threshold region_recall_by_size used", False),
    Field("region_recall_at_fpr", "fraction_by_fpr_and_size", "share of ground-truth regions of each size bin with at "
          "least metrics.region_overlap of their pixels above the threshold that leaves the given share "
          "(metrics.region_fprs) of the test set's normal pixels above it", False),
    Field("region_count_by_size", "count_by_size", "ground-truth regions per size bin (the recall's denominators)", False),
    Field("metrics_resolution", "text", "where pixel metrics were computed: native | setup | HxW", False),
    Field("pixel_thresholds", "text", "'all' (exact curves) or the number of thresholds of the streamed curves", False),
    # -- what was run ----------------------------------------------------------------------------------
    Field("setup", "text", "setup name (setup.name)"),
    Field("model", "text", "model name (model.name)"),
    Field("backbone", "text", "backbone name (backbone.name)"),
    Field("dataset", "text", "dataset name (dataset.name)"),
    Field("category", "text", "dataset category"),
    Field("seed", "count", "model seed (slot k uses seed + k)"),
    Field("num_tiles", "count", "tiles per image"),
    Field("num_models", "count", "trained models (slots)"),
    Field("merge_score", "text", "image score from tile scores: mean (paper 000 Eq. 5) | max", label="image score of tiles"),
    Field("merge_calibration", "text", "slot outputs put on one scale before merging: none | slot | slot_position",
          label="slot calibration"),
    Field("merge_window", "text", "weights of overlapping tile maps: flat (mean) | hann | cosine | tukey", label="overlap window"),
    Field("calibration_fitted_on", "text", "the normal images the slots' calibration statistics come from"),
    Field("block_contrast", "difference", "tile artefacts of the merged maps on normal test images: how much more "
          "the map steps across tile seams than across lines midway between them (narrow bands on each side), "
          "/ the map's spread on normal pixels (metrics/seams.py); null for a single tile", False,
          "block contrast (normal images)"),
    Field("block_contrast_off_seam", "ratio", "the control of block_contrast: the step across lines midway between "
          "seams / the same spread; null for a single tile", False, "map step off seams (control)"),
    Field("seam_ridge", "difference", "tile artefacts as lines: the mean of the merged maps of normal test images "
          "within a quarter cell of the tile seams minus the same within a quarter cell of the lines midway between "
          "them, / the same spread "
          "(metrics/seams.py); 0: no line, > 0: brighter seams; null for a single tile", False,
          "seam ridge (normal images)"),
    Field("inference_mode", "text", "sequential (one slot resident) | resident (all slots resident)"),
    Field("inference_features", "text", "per_tile | whole_image backbone features"),
    Field("fingerprint", "text", "hash of every setting that changes a result"),
    Field("slot_fingerprint", "text", "hash of every setting that changes a slot's weights"),
    Field("defect_share", "fraction", "mean anomalous share of a defective test image (paper 000 Fig. 7); null "
          "without masks", False),
    # -- cost ------------------------------------------------------------------------------------------
    Field("train_seconds", "seconds", "sum of the slots' own training times", label="train seconds (sum of slots)"),
    Field("train_wall_seconds", "seconds", "time during which at least one slot was training (a pause between "
          "a kill and a resume is not counted; parallel shards overlap)", False),
    Field("train_peak_mem_bytes", "bytes", "peak memory while training one slot (the largest slot)", label="train peak memory"),
    Field("resumed_slots", "count", "slots found trained (earlier run or another shard) instead of trained by this job"),
    Field("train_shards", "count", "distinct shards that trained the slots"),
    Field("checkpoint_bytes", "bytes", "disk size of every slot checkpoint together", label="checkpoints on disk"),
    Field("checkpoint_bytes_per_slot", "bytes", "disk size of the largest slot checkpoint", label="checkpoint per slot"),
    Field("slot_weights_bytes", "bytes", "every slot's own weights in memory (inference.mode=resident keeps them)"),
    Field("infer_seconds", "seconds", "prediction of the validation and test images, checkpoints read included"),
    Field("infer_images_per_second", "rate", "validation + test images / infer_seconds", label="predicted images per second"),
    Field("infer_peak_mem_bytes", "bytes", "peak memory of the model passes while predicting", label="inference peak memory"),
    Field("mem_kind", "text", "cuda: accelerator memory allocated | rss: process resident memory above its baseline"),
    Field("latency_ms", "ms", "speed protocol: mean time of one tiled inference step at batch size 1", False, "latency (ms)"),
    Field("throughput_images_per_second", "rate", "speed protocol: images per second at speed.batch_size", False,
          "throughput (images/s)"),
    Field("throughput_batch_size", "count", "speed protocol: batch size of the throughput measurement", False),
]

SCHEMA = {f.key: f for f in FIELDS}
#: The paper's two headline metrics: the cells of compare's tables (image AUROC / pixel AUPRO).
TABLE_METRICS = ("image_AUROC", "pixel_AUPRO")
#: Every accuracy metric (fractions), in table order.
METRICS = tuple(f.key for f in FIELDS if f.kind == "fraction" and f.label is not None)


def _valid(kind: str, value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "fraction":
        return number and (math.isnan(value) or 0.0 <= value <= 1.0)
    if kind == "seconds":
        return number and value >= 0
    if kind in ("bytes", "count"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind in ("rate", "ms"):
        return number and value > 0
    if kind == "ratio":
        return number and value >= 0
    if kind == "difference":
        return number and math.isfinite(value)
    if kind == "text":
        return isinstance(value, (str, int))  # pixel_thresholds: "all" or a count
    if kind == "fraction_by_size":
        return isinstance(value, dict) and all(_valid("fraction", v) for v in value.values())
    if kind == "count_by_size":
        return isinstance(value, dict) and all(_valid("count", v) for v in value.values())
    if kind == "fraction_by_fpr_and_size":
        return isinstance(value, dict) and all(_valid("fraction_by_size", v) for v in value.values())
    raise ValueError(f"unknown kind {kind!r}")


def problems(results: dict) -> list[str]:
    """What is wrong with ``results`` against the schema (empty when it conforms)."""
    out = [f"{key}: not in the results schema (tiled_hydra/metrics/schema.py)" for key in results if key not in SCHEMA]
    for field in FIELDS:
        if field.key not in results:
            if field.required:
                out.append(f"{field.key}: missing")
            continue
        value = results[field.key]
        if value is None and not field.required:
            continue
        if not _valid(field.kind, value):
            out.append(f"{field.key}={value!r}: expected {KINDS[field.kind]}")
    return out


def check(results: dict) -> None:
    """Raise ValueError naming every key that does not conform."""
    found = problems(results)
    if found:
        raise ValueError("results do not match the schema: " + "; ".join(found))
