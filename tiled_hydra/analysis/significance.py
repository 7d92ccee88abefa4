"""What ``compare`` says beyond mean ± std: how sure a number is, whether two setups really differ,
and how detection depends on defect size.

- 95 % bootstrap interval of every (dataset, model, setup) cell over test images (bootstrap.py):
  seeds averaged inside every draw, then categories averaged.
- Paired bootstrap difference of every setup against a baseline setup (default sm256) on the same
  draws of the same test images; a difference is marked significant (†) only when its 95 %
  interval excludes 0.
- Region recall by defect size, averaged over seeds and categories, one panel per dataset and
  model, one curve per setup: the direct form of paper Fig. 7.  By default at fixed pixel
  false-positive rates (results' ``region_recall_at_fpr``, one row of panels per rate), which mean
  the same on weak and strong maps; ``view="threshold"`` (or runs without it) draws
  ``region_recall_by_size`` at each run's validation-fitted threshold.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from tiled_hydra.metrics.bootstrap import DRAWS, PER_IMAGE_FILE, Difference, interval, load_per_image, seed_mean, stratified_draws
from tiled_hydra.analysis.runs import PAPER_MODELS, PAPER_SETUPS, TABLE_METRICS, paper_order

BASELINE = "sm256"


def column_of(run: dict) -> str:
    return f"{run['model']} ({run['variant']})" if run.get("variant") else str(run["model"])


def per_image_groups(runs: list[dict]) -> tuple[dict, list[str]]:
    """{(dataset, column, setup): {category: [PerImage of each seed]}} and notes on runs without records."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    missing = 0
    for run in runs:
        source = Path(str(run.get("source", "")))
        record = load_per_image(source / PER_IMAGE_FILE) if source.is_dir() else None
        if record is None:
            missing += 1
            continue
        groups[run["dataset"], column_of(run), run["setup"]][str(run["category"])].append(record)
    notes = [f"{missing} runs have no {PER_IMAGE_FILE} (older runs or W&B sources): left out of the intervals"] if missing else []
    return groups, notes


def category_mean(by_category: dict[str, list], metric: str, weights: dict[str, np.ndarray], paths: dict[str, np.ndarray]) -> np.ndarray:
    """Per draw: the metric averaged over seeds, then over categories."""
    return np.mean([seed_mean([r.aligned(paths[c]) for r in by_category[c]], metric, weights[c]) for c in weights], axis=0)


def intervals(runs: list[dict], baseline: str = BASELINE, draws: int = DRAWS, seed: int = 0) -> tuple[list[dict], list[str]]:
    """One row per (dataset, model, setup, metric): value, 95 % interval, and the paired difference to the baseline."""
    groups, notes = per_image_groups(runs)
    rows = []
    for dataset, column in sorted({(d, c) for d, c, _ in groups}):
        setups = paper_order({s for d, c, s in groups if (d, c) == (dataset, column)}, PAPER_SETUPS)
        base = groups.get((dataset, column, baseline))
        for setup in setups:
            group = groups[dataset, column, setup]
            categories = sorted(group if base is None else set(group) & set(base))
            if not categories:
                continue
            paths = {c: group[c][0].paths for c in categories}
            weights = {c: stratified_draws(group[c][0].aligned(paths[c]).labels, draws, seed) for c in categories}
            ones = {c: np.ones((1, len(paths[c]))) for c in categories}
            for metric in TABLE_METRICS:
                values = category_mean(group, metric, weights, paths)
                point = float(category_mean(group, metric, ones, paths)[0])
                if math.isnan(point):
                    continue
                row = {"dataset": dataset, "model": column, "setup": setup, "metric": metric, "value": point,
                       "low": interval(values)[0], "high": interval(values)[1], "categories": len(categories)}
                row |= {"diff": "", "diff_low": "", "diff_high": "", "significant": ""}
                if base is not None and setup != baseline:
                    diff = values - category_mean(base, metric, weights, paths)
                    low, high = interval(diff)
                    gap = Difference(point - float(category_mean(base, metric, ones, paths)[0]), low, high)
                    row |= {"diff": gap.mean, "diff_low": gap.low, "diff_high": gap.high, "significant": gap.significant}
                rows.append(row)
    return rows, notes


def to_markdown(rows: list[dict], baseline: str = BASELINE) -> str:
    lines = [f"### 95 % bootstrap intervals over test images; difference to {baseline} on the same images "
             "(paired; † = interval excludes 0)", "",
             "| dataset | model | setup | metric | value % | 95 % interval | vs " + baseline + " (pp) | 95 % interval |",
             "|---|---|---|---|---:|---|---:|---|"]
    for r in rows:
        compared = r["diff"] != ""
        diff = f"{100 * r['diff']:+.1f}{' †' if r['significant'] else ''}" if compared else ""
        diff_ci = f"[{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]" if compared else ""
        lines.append(f"| {r['dataset']} | {r['model']} | {r['setup']} | {r['metric']} | {100 * r['value']:.1f} | "
                     f"[{100 * r['low']:.1f}, {100 * r['high']:.1f}] | {diff} | {diff_ci} |")
    return "\n".join(lines) + "\n"


def _recall_curves(runs: list[dict], pick) -> tuple[dict, list[str]]:
    """{(dataset, column, setup): {size bin: [recall per run]}} and the bins, from ``pick(run)``
    ({size bin: recall} or None)."""
    curves: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels: list[str] = []
    for run in runs:
        recall = pick(run)
        if not isinstance(recall, dict):
            continue
        labels = labels or list(recall)
        for label, value in recall.items():
            if isinstance(value, (int, float)) and not math.isnan(value):
                curves[run["dataset"], column_of(run), run["setup"]][label].append(float(value))
    return curves, labels


def recall_by_size(runs: list[dict], out: Path, view: str = "fpr") -> tuple[Path | None, str | None]:
    """:func:`recall_figure` saved as ``out/region_recall_by_size.png``; returns (path or None, note or None)."""
    fig, note = recall_figure(runs, view)
    if fig is None:
        return None, note
    import matplotlib.pyplot as plt

    path = out / "region_recall_by_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, note


def recall_figure(runs: list[dict], view: str = "fpr"):
    """One panel per (dataset, model), one curve per setup: region recall per defect-size bin, mean
    over seeds and categories.  ``view="fpr"`` (default): one row of panels per pixel false-positive
    rate of ``region_recall_at_fpr``; ``"threshold"``: ``region_recall_by_size`` at the runs' own
    validation-fitted thresholds (also the fallback when no run reports the fixed-rate view).
    Returns (figure or None, note or None)."""
    rows: list[tuple[str, dict, list[str]]] = []
    note = None
    if view == "fpr":
        rates = sorted({f for r in runs if isinstance(r.get("region_recall_at_fpr"), dict) for f in r["region_recall_at_fpr"]},
                       key=float)
        for rate in rates:
            curves, labels = _recall_curves(runs, lambda r, f=rate: (r.get("region_recall_at_fpr") or {}).get(f))
            if curves:
                rows.append((f"at pixel FPR {float(rate):g} on normal test pixels", curves, labels))
        lacking = sum(1 for r in runs if r.get("region_recall_by_size") is not None and r.get("region_recall_at_fpr") is None)
        if rows and lacking:
            note = f"{lacking} runs report no region_recall_at_fpr (older results): left out of the recall-by-size figure"
        elif not rows:
            note = "no run reports region_recall_at_fpr: the recall-by-size figure shows region_recall_by_size at each run's own threshold"
    if not rows:
        curves, labels = _recall_curves(runs, lambda r: r.get("region_recall_by_size"))
        if curves:
            rows.append(("at the validation-fitted pixel threshold", curves, labels))
    if not rows:
        return None, "no run reports region_recall_by_size: no recall-by-size figure"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = {key for _, curves, _ in rows for key in curves}
    models = paper_order({m.split(" (")[0] for _, m, _ in every}, PAPER_MODELS)
    panels = sorted({(d, m.split(" (")[0]) for d, m, _ in every}, key=lambda p: (p[0], models.index(p[1])))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.4 * len(rows)), squeeze=False, sharey=True)
    order = (lambda k: (PAPER_SETUPS.index(k[2]) if k[2] in PAPER_SETUPS else 99, k))
    for row, (where, curves, labels) in zip(axes, rows):
        for ax, (dataset, model) in zip(row, panels):
            for key in sorted((k for k in curves if k[0] == dataset and k[1].split(" (")[0] == model), key=order):
                _, column, setup = key
                ys = [np.mean(curves[key][label]) if curves[key][label] else np.nan for label in labels]
                ax.plot(range(len(labels)), ys, marker="o", label=setup if column == model else f"{setup} {column}")
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(f"{model} on {dataset}\n{where}", fontsize=9)
            ax.set_xlabel("defect region size (share of the image)", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        row[0].set_ylabel("ground-truth regions detected")
    fig.suptitle("Region recall by defect size (a region is detected when >= region_overlap of its pixels are positive)",
                 fontsize=9)
    fig.tight_layout()
    return fig, note
