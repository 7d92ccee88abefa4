"""What a run leaves behind: results.json (written last, atomically), overlays (overlays.py), a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tiled_hydra.data.base import Split  # noqa: E402
from tiled_hydra.overlays import save_overlay  # noqa: E402

METRIC_KEYS = ("image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1")


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
