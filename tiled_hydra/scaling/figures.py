"""Paper 003's figures: per-model stacked memory/runtime per component (Fig. 2-7) and the
cross-model extrapolations (Fig. 8-9) with accelerator memory sizes and camera sensor sizes,
plus the table of the largest square resolution each memory size serves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tiled_hydra.scaling.study import curve_of, find_studies, fit_of, max_resolution_table  # noqa: E402
from tiled_hydra.scaling.study import verdict as study_verdict  # noqa: E402
from tiled_hydra.scaling.units import format_bytes  # noqa: E402

MIB, GIB = 2**20, 2**30
DPI = 120
KIND = {"cuda": "GPU allocator peak", "rss": "CPU: resident memory above start + resident state"}


def _stacked(ax, study: dict, key: str, scale: float) -> tuple[np.ndarray, float]:
    """Stacked bars per component at each side (x in px); returns the sides and the bar width."""
    records = study["measurements"]
    sides = np.array([r["resolution"] for r in records], dtype=float)
    width = 0.6 * (float(np.min(np.diff(sides))) if len(sides) > 1 else sides[0])
    bottom = np.zeros(len(sides))
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(study["components"]):
        values = np.array([r["components"][name][key] for r in records], dtype=float) / scale
        if not values.any():
            continue
        ax.bar(sides, values, width, bottom=bottom, label=name, color=colors(i % 10))
        bottom += values
    ax.set_xticks(sides, [f"{s:.0f}" for s in sides])
    ax.set_xlabel("image side (px), batch size 1")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return sides, width


def fit_label(study: dict, quantity: str, what: str) -> tuple[str, str]:
    """(legend label, line style) of a fitted total: solid when good, dashed and 'poor fit' when poor."""
    verdict, reasons = study_verdict(study, quantity)
    fit = fit_of(study, quantity) or {}
    r2 = fit.get("r2", math.nan)
    if verdict == "poor":
        return f"{what}: poor fit ({'; '.join(reasons)})", "--"
    h = fit.get("holdout") or {}
    hold = f", hold-out {100 * h['relative_error']:.2g} %" if h else ""
    return f"{what}: quadratic fit (R\u00b2 {r2:.3f}{hold})", "-"


def _fit_line(ax, study: dict, quantity: str, scale: float, what: str, color: str) -> None:
    curve = curve_of(study, quantity)
    if curve is None:
        return
    sides = [r["resolution"] for r in study["measurements"]]
    xs = np.linspace(min(sides) * 0.9, max(sides) * 1.05, 200)
    label, style = fit_label(study, quantity, what)
    ax.plot(xs, curve(xs) / scale, style, color=color, lw=1.4, label=label)


def memory_figure(study: dict):
    """Paper 003 Fig. 2/4/6: counted memory per component, the measured peak (median and range of
    the memory steps) and both fitted quadratics."""
    name, records = f"{study['model']} ({study['backbone']})", study["measurements"]
    kind = records[0]["mem_kind"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    sides, _ = _stacked(ax, study, "counted_bytes", MIB)
    peak = np.array([r["peak_bytes"] for r in records], dtype=float) / MIB
    low = peak - np.array([r.get("peak_bytes_min", r["peak_bytes"]) for r in records], dtype=float) / MIB
    high = np.array([r.get("peak_bytes_max", r["peak_bytes"]) for r in records], dtype=float) / MIB - peak
    ax.errorbar(sides, peak, yerr=[low, high], fmt="k_", markersize=22, mew=2, capsize=4, label=f"measured peak ({kind}; range)")
    _fit_line(ax, study, "counted_bytes", MIB, "Eq. 1-3", "tab:gray")
    _fit_line(ax, study, "peak_bytes", MIB, "measured peak", "black")
    ax.set_ylabel("memory (MiB)")
    ax.set_title(f"{name}: memory per component\n(Eq. 1-3: parameters + buffers + layer outputs)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def runtime_figure(study: dict):
    """Paper 003 Fig. 3/5/7: median time per component; error bars = interquartile range of the
    timed steps (thin: min-max); noisy points hatched; the fitted quadratic of the total."""
    name, records, s = f"{study['model']} ({study['backbone']})", study["measurements"], study["settings"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    sides, width = _stacked(ax, study, "seconds", 1e-3)
    median = np.array([r["seconds"] for r in records]) * 1e3
    q1 = np.array([r.get("seconds_q1", r["seconds"]) for r in records]) * 1e3
    q3 = np.array([r.get("seconds_q3", r["seconds"]) for r in records]) * 1e3
    lo = np.array([r.get("seconds_min", r["seconds"]) for r in records]) * 1e3
    hi = np.array([r.get("seconds_max", r["seconds"]) for r in records]) * 1e3
    ax.errorbar(sides, median, yerr=[median - lo, hi - median], fmt="none", ecolor="black", elinewidth=0.6, capsize=2)
    ax.errorbar(sides, median, yerr=[median - q1, q3 - median], fmt="none", ecolor="black", elinewidth=1.6, capsize=5,
                label="interquartile range (thin: min-max)")
    noisy = [i for i, r in enumerate(records) if r.get("noisy")]
    if noisy:
        ax.bar(sides[noisy], median[noisy], width, fill=False, hatch="//", edgecolor="red", lw=0,
               label=f"noisy: IQR / median > {s.get('timing', {}).get('max_relative_iqr')}")
    _fit_line(ax, study, "seconds", 1e-3, "time", "black")
    threads = s.get("threads", {}).get("torch", s.get("torch_threads"))
    steps = f"median of >= {s['repeats']} timed steps, round-robin, after {s['warmup']} warm-up rounds"
    ax.set_ylabel("time per image (ms)")
    ax.set_title(f"{name}: runtime per component\n({s['device']}, {threads} thread(s), {steps})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def study_figures(study: dict, out: Path) -> list[Path]:
    paths = []
    for draw, file in ((memory_figure, "memory_components.png"), (runtime_figure, "runtime_components.png")):
        fig = draw(study)
        fig.savefig(out / file, dpi=DPI)
        plt.close(fig)
        paths.append(out / file)
    return paths


# -- several studies ------------------------------------------------------------------------------
def _label(study: dict, several_backbones: bool) -> str:
    return f"{study['model']} ({study['backbone']})" if several_backbones else study["model"]


def _guides(ax, studies: list[dict], horizontal: bool, top_y: float | None) -> None:
    s = studies[0]["settings"]
    for mp in s["sensor_mp"]:
        side = math.sqrt(mp * 1e6)
        ax.axvline(side, color="grey", lw=0.8, ls=":")
        ax.text(side, 0.99, f" {mp:g} MP", transform=ax.get_xaxis_transform(), fontsize=7, va="top", rotation=90)
    if horizontal:
        for size in s["memory_sizes"]:
            if top_y is None or size / GIB <= top_y:
                ax.axhline(size / GIB, color="tab:red", lw=0.7, ls="--", alpha=0.6)
                ax.text(1.0, size / GIB, f" {format_bytes(size)}", transform=ax.get_yaxis_transform(), fontsize=7,
                        va="center", color="tab:red")


def x_range(studies: list[dict]) -> float:
    """The curves reach the largest extrapolation side or the largest square sensor, whichever is larger."""
    s = studies[0]["settings"]
    return max([*s["extrapolate_to"], *(math.sqrt(mp * 1e6) for mp in s["sensor_mp"])]) * 1.02


def extrapolated(studies: list[dict], out: Path, quantity: str, scale: float, ylabel: str, title: str, path: str,
                 horizontal: bool) -> Path | None:
    if not studies:
        return None
    several = len({s["backbone"] for s in studies}) > 1
    top = x_range(studies)
    xs = np.linspace(0, top, 300)
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab10")
    highest = 0.0
    for i, study in enumerate(studies):
        curve = curve_of(study, quantity)
        if curve is None:
            continue
        color = colors(i % 10)
        ys = curve(xs) / scale
        highest = max(highest, float(np.max(ys)))
        poor = study_verdict(study, quantity)[0] == "poor"
        ax.plot(xs, ys, "--" if poor else "-", color=color,
                label=_label(study, several) + (" (poor fit)" if poor else ""))
        measured = study["measurements"]
        ax.plot([r["resolution"] for r in measured], [r[quantity] / scale for r in measured], "o", color=color, ms=4)
    top_y = highest * 1.08 if horizontal else None
    _guides(ax, studies, horizontal, top_y)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top_y)
    ax.set_xlabel("square image side (px); dots measured, lines the fitted quadratic (Eq. 3-4), dashed: poor fit")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / path, dpi=DPI)
    plt.close(fig)
    return out / path


def table_rows(studies: list[dict], quantity: str) -> list[dict]:
    """Max-resolution rows recomputed from each study's fits and settings (same rule for old files)."""

    return [row for s in studies for row in max_resolution_table(
        s, s["settings"]["memory_sizes"], s["settings"]["tile_size"], s["settings"]["tiled_bytes_per_pixel"], quantity)]


def table_markdown(studies: list[dict], quantity: str) -> str:
    rows = table_rows(studies, quantity)
    if not rows:
        return ""
    sizes = sorted({r["memory_bytes"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    tile = rows[0]["tile_size"]
    what = "hook-counted memory (Eq. 1-3)" if quantity == "counted_bytes" else "measured peak memory"
    lines = [f"Largest square side (px) per memory size from the fitted {what}: single model / tiled ensemble "
             f"({tile} px tiles; '-' = does not fit; n/a = the fit bends down, no limit; * = from a poor fit)", "",
             "| model | " + " | ".join(format_bytes(s) for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for model in models:
        cells = []
        for size in sizes:
            row = next(r for r in rows if r["model"] == model and r["memory_bytes"] == size)
            single = "n/a" if row.get("concave_fit") else row["single_model_side"] or "-"
            tiled = row["tiled_side"] or "-"
            mark = "*" if row.get("fit_verdict") == "poor" else ""
            cells.append(f"{single}{mark} / {tiled}{mark}")
        lines.append(f"| {model} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def fits_markdown(studies: list[dict]) -> str:
    """Verdict, R^2, hold-out error at the largest side and the extrapolation of every total, per model."""
    top = max(max(s["settings"]["extrapolate_to"]) for s in studies)
    names = {"counted_bytes": "memory, Eq. 1-3", "peak_bytes": "measured peak", "seconds": "time per image"}
    lines = ["| model | quantity | verdict | R^2 | hold-out side | hold-out rel. error | measured at largest | "
             f"extrapolated to {top} px |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for study in studies:
        for f in study["fits"]:
            if f["component"] != "total":
                continue
            h = f["holdout"] or {}
            value = f["extrapolated"].get(str(top))
            show = (lambda v: f"{v:.3g} s") if f["quantity"] == "seconds" else format_bytes
            verdict = study_verdict(study, f["quantity"])[0]
            lines.append(f"| {study['model']} | {names[f['quantity']]} | {verdict} | {f['r2']:.5f} | {h.get('x', 0):.0f} | "
                         f"{100 * h['relative_error']:.2f} % | {show(h['measured'])} | {show(value)} |" if h else
                         f"| {study['model']} | {names[f['quantity']]} | {verdict} | {f['r2']:.5f} | - | - | - | {show(value)} |")
    return "\n".join(lines) + "\n"


def shares_markdown(studies: list[dict]) -> str:
    """Share of every component in counted memory and in time at the largest measured side."""
    lines = ["| model | side | memory (Eq. 1-3) by component | time by component |", "|---|---:|---|---|"]
    for study in studies:
        r = study["measurements"][-1]
        mem = sum(c["counted_bytes"] for c in r["components"].values()) or 1
        sec = sum(c["seconds"] for c in r["components"].values()) or 1
        by_mem = sorted(r["components"].items(), key=lambda kv: -kv[1]["counted_bytes"])
        by_sec = sorted(r["components"].items(), key=lambda kv: -kv[1]["seconds"])
        lines.append(f"| {study['model']} | {r['resolution']} | "
                     + ", ".join(f"{n} {100 * c['counted_bytes'] / mem:.0f} %" for n, c in by_mem if c["counted_bytes"]) + " | "
                     + ", ".join(f"{n} {100 * c['seconds'] / sec:.0f} %" for n, c in by_sec if c["seconds"] / sec >= 0.005) + " |")
    return "\n".join(lines) + "\n"


def cross_model(studies: list[dict], out: Path) -> list[Path]:
    """Fig. 8-9 analogues and the max-resolution table for every study found; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    device = "/".join(sorted({s["settings"]["device"] for s in studies}))
    files = [
        extrapolated(studies, out, "counted_bytes", GIB, "memory (GiB), Eq. 1-3, batch size 1",
                     "Extrapolated inference memory (Eq. 1-3), accelerator memory sizes (red), square sensors (grey)",
                     "memory_extrapolated.png", True),
        extrapolated(studies, out, "peak_bytes", GIB, f"measured peak memory (GiB, {device})",
                     "Extrapolated measured peak memory, accelerator memory sizes (red), square sensors (grey)", "peak_extrapolated.png", True),
        extrapolated(studies, out, "seconds", 1.0, f"time per image (s, {device})",
                     "Extrapolated inference time per image, square sensors (grey)", "runtime_extrapolated.png", False),
    ]
    text = "\n".join(t for t in (table_markdown(studies, q) for q in ("counted_bytes", "peak_bytes")) if t)
    (out / "max_resolution.md").write_text(text)
    rows = table_rows(studies, "counted_bytes") + table_rows(studies, "peak_bytes")
    with (out / "max_resolution.csv").open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / "fits.md").write_text(fits_markdown(studies))
    (out / "components.md").write_text(shares_markdown(studies))
    return [f for f in files if f] + [out / n for n in ("max_resolution.md", "max_resolution.csv", "fits.md", "components.md")]


def compare_studies(sources: list[str], out: Path) -> bool:
    """What ``python -m tiled_hydra.compare`` draws for scaling studies (scaling.json below the
    sources). True when the sources hold studies and no runs, so compare has nothing else to do."""
    studies = find_studies(sources)
    if not studies:
        return False
    files = cross_model(studies, out)
    print(f"{len(studies)} scaling studies -> " + ", ".join(str(f) for f in files))
    return not any(Path(s).is_dir() and next(Path(s).rglob("results.json"), None) for s in sources)
