"""What a run leaves behind: results.json (written last, atomically), overlays (overlays.py), a table."""

from __future__ import annotations

from pathlib import Path

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tiled_hydra.data.base import Split  # noqa: E402
from tiled_hydra.overlays import save_overlay  # noqa: E402

METRIC_KEYS = ("image_AUROC", "pixel_AUPRO", "pixel_AUPRO_05", "pixel_AUROC", "pixel_AP", "image_F1", "pixel_F1")


def write_json_atomic(path: Path, payload: dict) -> None:
    from tiled_hydra.rundir import write_json_atomic as write

    write(path, payload)  # a unique temporary name: concurrent writers never share one


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


def print_table(results: dict) -> None:
    table = Table(title=f"{results['setup']} / {results['model']} / {results['backbone']} on {results['dataset']}:{results['category']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRIC_KEYS:
        if key in results:
            table.add_row(key, f"{results[key]:.4f}")
    counts = results.get("region_count_by_size", {})
    for label, recall in results.get("region_recall_by_size", {}).items():
        table.add_row(f"region recall {label}", "no region" if recall != recall else f"{recall:.3f} of {counts.get(label, '?')}")
    if "merge_score" in results:
        table.add_row("image score of tiles", str(results["merge_score"]))
    if "metrics_resolution" in results:
        table.add_row("pixel metrics at", str(results["metrics_resolution"]))
    table.add_row("train_seconds", f"{results['train_seconds']:.1f}")
    table.add_row("infer_images_per_second", f"{results['infer_images_per_second']:.2f}")
    for key in ("train_peak_mem_bytes", "infer_peak_mem_bytes"):
        table.add_row(f"{key} ({results['mem_kind']})", f"{results[key] / 2**20:.1f} MiB")
    Console().print(table)


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
