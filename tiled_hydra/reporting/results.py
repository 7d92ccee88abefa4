"""What a run prints and leaves beside results.json: the results table, the per-image predictions,
the region-recall figure. (results.json itself is written last by :mod:`tiled_hydra.pipeline`.)"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from tiled_hydra.data.base import Split
from tiled_hydra.metrics.schema import FIELDS

TEST_PREDICTIONS_FILE = "test_predictions.csv"


def write_test_predictions(run_dir: Path, split: Split, scores: torch.Tensor, pred_labels: torch.Tensor) -> None:
    """Per test image: its file, label, raw score and predicted label (what ``predict`` reproduces)."""
    path = Path(run_dir) / TEST_PREDICTIONS_FILE
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score", "pred_label"])
        for i in range(len(split)):
            writer.writerow([split.paths[i] if split.paths else i, int(split.labels[i]), repr(float(scores[i])), int(pred_labels[i])])
    os.replace(tmp, path)


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
    for label, recall in results.get("region_recall_by_size", {}).items():
        table.add_row(f"region recall {label}", "no region" if recall != recall else f"{recall:.3f} of {counts.get(label, '?')}")
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
