"""What a run prints and leaves beside results.json: the results table, the per-image predictions
and anomaly maps, the region-recall figure. (results.json itself is written last by
:mod:`tiled_hydra.pipeline`.)"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tiled_hydra.core.postprocess import Postprocessor
from tiled_hydra.data.base import Split
from tiled_hydra.metrics.schema import FIELDS
from tiled_hydra.reporting.maps import PNG_THRESHOLD_CODE, at_size, file_names, write_map

log = logging.getLogger("tiled_hydra")

TEST_PREDICTIONS_FILE = "test_predictions.csv"
MAPS_DIR = "maps"
# A run's test_predictions.csv: the first four columns are those of earlier versions (readers index them).
TEST_PREDICTION_COLUMNS = ["path", "label", "score", "pred_label", "normalized_score", "anomalous_area_px",
                           "anomalous_area_fraction", "map"]
# Every per-image column of a run's test_predictions.csv and of predict's predictions.csv, written beside
# each CSV as NAME.columns.txt.
COLUMN_NOTES = {
    "path": "the image file (a run's test set without files: the image's index)",
    "label": "ground truth: 1 = defective, 0 = normal",
    "score": "raw image score of the model (its own scale; compare with image_threshold in the run's postprocess.json)",
    "normalized_score": "the score min-max normalised so that the image threshold is 0.5, clipped to [0, 1] "
                        "(with postprocess.json; in a run without a validation split, with the cross-fitted "
                        "thresholds of the image's fold, as pred_label)",
    "pred_label": "1 = anomalous (score >= image threshold), 0 = normal; decided by the image score alone",
    "anomalous_area_px": "pixels of the map (at the image's own size) at or above the pixel threshold: the region "
                         "the overlay outlines. 0 with pred_label 1: flagged by the image score, no pixel above "
                         "the pixel threshold",
    "anomalous_area_fraction": "anomalous_area_px / image pixels",
    "map": f"the anomaly map file at the image's own size (png: 16-bit, normalised like normalized_score but with "
           f"the pixel threshold: normalised = value / 65535, anomalous where value >= {PNG_THRESHOLD_CODE}; "
           f"npy: raw float32 map). A run's are relative to its run dir, empty with report.maps=false",
    "overlay": "the overlay picture: image, map with colour bar, predicted region outlined, score, threshold and label",
}


def write_column_notes(csv_path: Path, columns: Sequence[str]) -> Path:
    """``NAME.columns.txt`` beside ``NAME.csv``: one ``column: meaning`` line per column."""
    path = Path(csv_path).with_suffix(".columns.txt")
    path.write_text("".join(f"{c}: {COLUMN_NOTES[c]}\n" for c in columns))
    return path


def write_test_predictions(run_dir: Path, split: Split, scores: torch.Tensor, pred_labels: torch.Tensor,
                           maps: torch.Tensor, scoring: Sequence[Postprocessor], maps_format: str | None) -> Path:
    """Per test image: its file, label, raw and normalised score, predicted label, anomalous area, and
    (``maps_format`` png or npy) its map file in RUN_DIR/maps/ at the image's own size (the setup's
    when the dataset does not record it). ``scoring[i]``: the postprocessor that labelled image i.

    One image's map is upsampled, written and dropped at a time: a test set of 1200x800 images
    never holds more than one full-size map."""
    run_dir = Path(run_dir)
    known = len(split.native_sizes) == len(split)
    names = file_names(split.paths, len(split))
    if maps_format:
        (run_dir / MAPS_DIR).mkdir(exist_ok=True)
    rows, start = [], time.perf_counter()
    for i in range(len(split)):
        post = scoring[i]
        own = at_size(maps[i], split.native_sizes[i] if known else tuple(maps.shape[-2:]))
        area = int((own >= post.pixel_threshold).sum())
        map_file = write_map(run_dir / MAPS_DIR / names[i], own, post, maps_format) if maps_format else None
        rows.append([split.paths[i] if split.paths else i, int(split.labels[i]), repr(float(scores[i])),
                     int(pred_labels[i]), round(float(post.normalize_scores(scores[i : i + 1])[0]), 6), area,
                     round(area / own.numel(), 6), "" if map_file is None else str(map_file.relative_to(run_dir))])
        del own
    if maps_format and len(split):
        seconds = time.perf_counter() - start
        log.info("maps: %d %s files in %s/ (%.3f s per image)", len(split), maps_format, run_dir / MAPS_DIR,
                 seconds / len(split))
    path = run_dir / TEST_PREDICTIONS_FILE
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TEST_PREDICTION_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, path)
    write_column_notes(path, TEST_PREDICTION_COLUMNS)
    return path


def format_value(kind: str, value) -> str:
    if value is None:
        return "n/a"
    if kind == "fraction":
        return "undefined" if value != value else f"{value:.4f}"
    if kind == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if kind == "seconds":
        return f"{value:.1f}"
    if kind in ("rate", "ms"):
        return f"{value:.2f}"
    if kind in ("ratio", "difference"):
        return f"{value:.3f}"
    return str(value)


def print_table(results: dict, note: str | None = None) -> None:
    """The schema's labelled keys of ``results`` as a table on the terminal; ``note`` below it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['setup']} / {results['model']} / {results['backbone']} on {results['dataset']}:{results['category']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for field in FIELDS:
        if field.label is None or field.key not in results:
            continue
        label = f"{field.label} ({results.get('mem_kind', '?')})" if field.key.endswith("_mem_bytes") else field.label
        table.add_row(label, format_value(field.kind, results[field.key]))
    counts = results.get("region_count_by_size", {})
    at_fpr = results.get("region_recall_at_fpr", {})
    if counts:
        views = ["pixel threshold", *(f"FPR {float(rate):.0%}" for rate in at_fpr)]
        table.add_row("region recall by size", " | ".join(views))
    for label, recall in results.get("region_recall_by_size", {}).items():
        if not counts.get(label):
            table.add_row(f"  {label} of the image", "no region")
            continue
        values = [recall, *(by_size.get(label, float("nan")) for by_size in at_fpr.values())]
        table.add_row(f"  {label} of the image", " | ".join(f"{v:.2f}" for v in values) + f"  of {counts[label]}")
    if "metrics_resolution" in results:
        table.add_row("pixel metrics at", str(results["metrics_resolution"]))
    console = Console()
    console.print(table)
    if note:
        console.print(note)


def write_region_recall_figure(run_dir: Path, results: dict) -> Path | None:
    """Bar chart of region_recall_by_size (share of ground-truth regions found, per defect size)."""
    recall = results.get("region_recall_by_size")
    if not recall:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = results.get("region_count_by_size", {})
    labels = list(recall)
    fig, ax = plt.subplots(figsize=(5, 3))
    values = [0.0 if v != v else v for v in recall.values()]  # NaN (no region of that size): no bar
    bars = ax.bar(range(len(labels)), values, color="tab:blue")
    for bar, label in zip(bars, labels):
        n = counts.get(label, 0)
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, f"n={n}" if n else "none", ha="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("defect region size (share of the image)")
    ax.set_ylabel("regions detected")
    ax.set_title(f"{results['setup']} / {results['model']}: region recall at {results.get('metrics_resolution', '?')} resolution",
                 fontsize=9)
    fig.tight_layout()
    path = run_dir / "region_recall.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
