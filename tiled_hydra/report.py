"""What a run leaves behind: results.json (written last, atomically), overlays, a table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tiled_hydra.data.base import Split  # noqa: E402

METRIC_KEYS = ("image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1")


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


def save_overlay(path: Path, image: torch.Tensor, mask: torch.Tensor | None, anomaly_map: torch.Tensor,
                 prediction: torch.Tensor | None, title: str) -> None:
    panels = [("image", image.permute(1, 2, 0).numpy(), None), ("ground truth", None if mask is None else mask.numpy(), "gray"),
              ("anomaly map", anomaly_map.numpy(), "jet"), ("prediction", None if prediction is None else prediction.numpy(), "gray")]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (name, array, cmap) in zip(axes, panels):
        ax.set_title(name)
        ax.axis("off")
        if array is None:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center")
        elif name == "anomaly map":
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.imshow(array, cmap=cmap, alpha=0.5, vmin=0, vmax=1)
        else:
            ax.imshow(array, cmap=cmap, vmin=0, vmax=255 if name == "image" else 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
                  pred_masks: torch.Tensor | None, overlays: int) -> None:
    overlay_dir = run_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    for i, tag in overlay_indices(scores, test.labels, overlays):
        name = Path(test.paths[i]).stem if test.paths else str(i)
        kind = test.defect_types[i] if test.defect_types else ("defect" if test.labels[i] else "good")
        save_overlay(overlay_dir / f"{tag}_{kind}_{name}.png", test.images[i],
                     None if test.masks is None else test.masks[i], norm_maps[i],
                     None if pred_masks is None else pred_masks[i], f"{tag}: {kind}/{name}  score {float(scores[i]):.3f}")
