"""The paper's Figures 5-8 from measured runs (records made by ``tiled_hydra.compare``).

Each function returns (PNG path, None) or (None, a note saying which data is missing): a figure
without its data is skipped, never faked.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from tiled_hydra.analysis.runs import PAPER_MODELS, PAPER_SETUPS, RESOLUTION_STUDY, CompareError, paper_order  # noqa: E402

MIB = 2**20
DPI = 120
PERCENT_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)  # Fig. 7 x-axis, % of the image
MEMORY_STYLES = {"infer_peak_mem_bytes": ("-", "o"), "train_peak_mem_bytes": ("--", "s")}  # Fig. 6 line, marker
MEMORY_KINDS = {"cuda": "GPU, peak allocated", "rss": "CPU, process RSS above start"}


def load_datastats(path: Path) -> dict[tuple[str, str], float]:
    """{(dataset, category): defect share} from the JSON written by ``tiled_hydra.datastats``."""
    try:
        entries = json.loads(Path(path).read_text())
        return {(e["dataset"], e["category"]): float(e["defect_share"]) for e in entries.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CompareError(f"datastats={path}: not a file written by python -m tiled_hydra.datastats ({err})") from None


def defect_sizes_from_runs(runs: list[dict]) -> dict[tuple[str, str], float]:
    """{(dataset, category): defect share} from the runs' own ``defect_share`` (mean over runs)."""
    shares = defaultdict(list)
    for run in runs:
        if run.get("defect_share") is not None:
            shares[run["dataset"], run["category"]].append(float(run["defect_share"]))
    return {key: statistics.fmean(values) for key, values in shares.items()}


def grid_runs(runs: list[dict], *keys: str) -> list[dict]:
    """Runs of the setup grid (not the resolution study) that have every key."""
    return [r for r in runs if r["study"] != RESOLUTION_STUDY and all(r.get(k) is not None for k in keys)]


def memory_label(runs: list[dict]) -> str:
    kinds = {r.get("mem_kind") for r in runs}
    return MEMORY_KINDS.get(kinds.pop(), "") if len(kinds) == 1 else "mixed GPU/CPU runs"


def grouped_bars(ax, runs: list[dict], value, ylabel: str, title: str) -> None:
    """Bars per model, grouped by setup in paper order; height = mean over the runs."""
    setups = paper_order({r["setup"] for r in runs}, PAPER_SETUPS)
    models = paper_order({r["model"] for r in runs}, PAPER_MODELS)
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        heights = []
        for setup in setups:
            values = [value(r) for r in runs if r["setup"] == setup and r["model"] == model]
            heights.append(statistics.fmean(values) if values else np.nan)
        ax.bar(np.arange(len(setups)) + (i - (len(models) - 1) / 2) * width, heights, width, label=model)
    ax.set_xticks(np.arange(len(setups)), [s.upper() for s in setups])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def shared_legend(fig, ax) -> None:
    """One legend above both panels, so it never hides a bar."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 1.0))


def save(fig, path: Path, top: float = 0.9) -> Path:
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def memory_per_setup(runs: list[dict], out: Path):
    """Fig. 5: peak inference and training memory per setup, bars per model."""
    runs = grid_runs(runs, "infer_peak_mem_bytes", "train_peak_mem_bytes")
    if not runs:
        return None, "Fig. 5 skipped: no run with infer_peak_mem_bytes / train_peak_mem_bytes"
    label = f"peak memory (MiB; {memory_label(runs)})"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    grouped_bars(axes[0], runs, lambda r: r["infer_peak_mem_bytes"] / MIB, label, "Inference memory")
    grouped_bars(axes[1], runs, lambda r: r["train_peak_mem_bytes"] / MIB, label, "Training memory (largest model slot)")
    shared_legend(fig, axes[0])
    return save(fig, out / "fig5_memory.png"), None


def speed_per_setup(runs: list[dict], out: Path):
    """Fig. 8: latency (batch size 1) and throughput per setup, bars per model."""
    runs = grid_runs(runs, "latency_ms", "throughput_images_per_second")
    if not runs:
        return None, "Fig. 8 skipped: no run with latency_ms / throughput_images_per_second (speed.enabled=true)"
    device = "GPU" if all(r.get("mem_kind") == "cuda" for r in runs) else "CPU"
    batch = sorted({r.get("throughput_batch_size") for r in runs if r.get("throughput_batch_size")})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    grouped_bars(axes[0], runs, lambda r: r["latency_ms"], "latency (ms per image)", f"Latency, batch size 1 ({device})")
    grouped_bars(axes[1], runs, lambda r: r["throughput_images_per_second"], "throughput (images / s)",
                 f"Throughput, batch size {'/'.join(map(str, batch)) or '?'} ({device})")
    shared_legend(fig, axes[0])
    return save(fig, out / "fig8_latency_throughput.png"), None


def resolution_series(run: dict) -> str:
    """Curve of a run in Fig. 6, from its setup name (the resolution sweeps name them sm<size> / ens<size>_tile256)."""
    name, tiles = str(run["setup"]), f"{run.get('tile_size')} px tiles, stride {run.get('stride')}"
    if name.startswith("sm"):
        return f"{run['model']}, single model"
    if name.startswith("st"):
        return f"{run['model']}, one shared model ({tiles})"
    return f"{run['model']}, tiled ensemble ({tiles})"


def resolution_study(runs: list[dict], out: Path):
    """Fig. 6: pixel AUPRO and peak memory versus image size, single model vs tiled ensemble.

    Drawn from the resolution sweeps; without them, from the single-model and ensemble setups of
    the grid (e.g. SM256, SM512 and ENS4 give 256 and 512 px), and titled as such.
    """
    study = [r for r in runs if r["study"] == RESOLUTION_STUDY and r.get("image_size")]
    origin = "resolution study"
    if not study:
        study = [r for r in grid_runs(runs, "image_size") if str(r["setup"]).startswith(("sm", "ens"))]
        origin = "setup grid (+sweep=resolution_single / resolution_ensemble for the full study)"
    if len({r["image_size"] for r in study}) < 2:
        return None, "Fig. 6 skipped: no runs at two or more image sizes (+sweep=resolution_single / resolution_ensemble)"
    series: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in study:
        series[resolution_series(run)][run["image_size"]].append(run)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for (name, by_size), color in zip(sorted(series.items()), plt.cm.tab10.colors):
        xs = sorted(by_size)
        aupro = [[100 * r["pixel_AUPRO"] for r in by_size[x] if r.get("pixel_AUPRO") is not None] for x in xs]
        axes[0].errorbar(xs, [np.mean(v) if v else np.nan for v in aupro],
                         yerr=[np.std(v) if len(v) > 1 else 0 for v in aupro], marker="o", capsize=3, color=color, label=name)
        for key, style in MEMORY_STYLES.items():
            mem = [np.mean([r[key] / MIB for r in by_size[x] if r.get(key) is not None] or [np.nan]) for x in xs]
            axes[1].plot(xs, mem, style[0], marker=style[1], color=color)
    where = ", ".join(sorted({f"{r['dataset']} {r['category']}" for r in study}))
    axes[0].set_ylabel("pixel AUPRO (%)")
    axes[0].set_title(f"Localization vs resolution ({where})", fontsize=10)
    axes[1].set_ylabel(f"peak memory (MiB; {memory_label(study)})")
    axes[1].set_title("Memory vs resolution", fontsize=10)
    for ax in axes:
        ax.set_xlabel("image size (px)")
        ax.set_xticks(sorted({r["image_size"] for r in study}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)  # colors: one per curve; the memory panel only tells the line styles apart
    axes[1].legend([plt.Line2D([], [], color="k", linestyle=ls, marker=m) for ls, m in MEMORY_STYLES.values()],
                   ["inference", "training (largest slot)"], fontsize=8)
    fig.suptitle(f"From the {origin}", fontsize=9)
    return save(fig, out / "fig6_resolution.png", top=0.95), None


def defect_size(runs: list[dict], out: Path, stats: dict[tuple[str, str], float] | None):
    """Fig. 7: image AUROC and pixel AUPRO per category (mean over models and seeds) vs defect size."""
    if not stats:
        return None, ("Fig. 7 skipped: no defect sizes (no defect_share in the runs); measure them with "
                      "`python -m tiled_hydra.datastats dataset=... dataset.category=...` and pass datastats=FILE")
    runs = [r for r in grid_runs(runs) if (r["dataset"], r["category"]) in stats]
    if not runs:
        return None, "Fig. 7 skipped: the datastats file has none of the runs' dataset/category pairs"
    present = {r["setup"] for r in runs}
    pair = {"sm256", "ens9"}  # the paper's pair; other grids show every setup they have
    setups = ["sm256", "ens9"] if pair <= present else paper_order(present, PAPER_SETUPS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric, name in zip(axes, ("image_AUROC", "pixel_AUPRO"), ("image AUROC (%)", "pixel AUPRO (%)")):
        for setup, marker, color in zip(setups, "os^vDP", plt.cm.tab10.colors):
            points = defaultdict(list)
            for r in runs:
                if r["setup"] == setup and r.get(metric) is not None:
                    points[r["dataset"], r["category"]].append(100 * r[metric])
            if not points:
                continue
            keys = sorted(points, key=lambda k: stats[k])
            x = np.array([100 * stats[k] for k in keys])
            y = np.array([np.mean(points[k]) for k in keys])
            ax.scatter(x, y, marker=marker, color=color, label=setup.upper())
            if len(keys) >= 3 and len(set(x)) > 1:  # trend line, as in the paper, for readability
                slope, intercept = np.polyfit(np.log10(x), y, 1)
                xs = np.logspace(math.log10(x.min()), math.log10(x.max()), 50)
                ax.plot(xs, slope * np.log10(xs) + intercept, color=color, alpha=0.6)
            if len(keys) <= 15 and setup == setups[0]:
                for k, xi, yi in zip(keys, x, y):
                    ax.annotate(k[1], (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7, alpha=0.8)
        ax.set_xscale("log")
        shares = [100 * stats[r["dataset"], r["category"]] for r in runs]
        ax.set_xlim(min(shares) / 1.6, max(shares) * 1.6)
        ax.set_xticks([t for t in PERCENT_TICKS if min(shares) / 1.6 <= t <= max(shares) * 1.6])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("defect size: anomalous share of a defective image (log scale)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Effect of defect size (each point: one category, mean over models and seeds)", fontsize=10)
    return save(fig, out / "fig7_defect_size.png", top=0.95), None
