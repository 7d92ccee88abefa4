"""Compare runs the way the paper does: Tables 1-2 (and per category) and Figures 5-8.

    python -m tiled_hydra.compare sources=SOURCE [out=DIR] [datastats=FILE] [from_wandb=true]
    python -m tiled_hydra.compare sources=[SOURCE,SOURCE,...]

SOURCE is
- a multirun (or any) directory: every results.json below it, with its job's .hydra/config.yaml;
  a directory without results.json is searched for W&B offline runs instead (from_wandb=true forces that);
- W&B offline run directories (``.../wandb/offline-run-*``), read without the network;
- a W&B project path ``entity/project`` (online, after ``wandb login``).

Cells are ``image AUROC / pixel AUPRO`` in percent: for every seed the mean over categories, then
mean ± sample standard deviation over seeds.  Per column and metric the best value is **bold** and
the second best _underlined_ (italic in Markdown, which has no underline); ties share a mark.
Runs of the resolution study (``study: resolution``, Fig. 6) stay out of the tables.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from tiled_hydra.analysis import significance

from tiled_hydra.analysis.runs import (  # noqa: F401  (re-exported: the records are compare's vocabulary)
    IDENTITY_KEYS,
    PAPER_MODELS,
    PAPER_SETUPS,
    RESOLUTION_STUDY,
    TABLE_METRICS,
    CompareError,
    label_variants,
    make_run,
    paper_order,
    settings_of,
    side,
)

WANDB_PROJECT = re.compile(r"[\w.-]+/[\w.-]+")
BEST, SECOND = 1, 2


# -- reading runs ----------------------------------------------------------------------------------
def job_config(results_file: Path) -> dict:
    """The job's saved configuration (resolved where it can be), or {} when there is none."""
    path = results_file.parent / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only Hydra can resolve (${hydra:...}): keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def runs_from_results(root: Path) -> list[dict]:
    return [make_run(json.loads(p.read_text()), job_config(p), str(p.parent)) for p in sorted(root.rglob("results.json"))]


def is_offline_run(path: Path) -> bool:
    return path.suffix == ".wandb" or (path.is_dir() and any(path.glob("run-*.wandb")))


def runs_from_offline(dirs: list[Path]) -> list[dict]:
    from tiled_hydra.analysis.wandb_reader import read_offline_run

    runs = []
    for d in dirs:
        try:
            record = read_offline_run(d)
        except Exception:  # a run still being written, or a damaged file: reported as a run without results
            runs.append({"source": str(d)})
            continue
        runs.append(make_run(record["summary"], record["config"], str(d)))
    return runs


def runs_from_wandb_project(path: str) -> list[dict]:
    """Runs of an online W&B project; any failure (offline, no login, no project) is one line."""
    try:
        import wandb

        api = wandb.Api(timeout=30)
        return [make_run(dict(r.summary_metrics), dict(r.config), f"wandb:{path}/{r.id}") for r in api.runs(path)]
    except Exception as err:  # wandb raises many types; the user needs the first line only
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompareError(f"cannot read W&B project {path}: {reason}") from None


def load_runs(sources: list[str], from_wandb: bool = False) -> tuple[list[dict], list[str]]:
    """Complete runs from every SOURCE, duplicates removed; plus notes on what was left out."""
    runs: list[dict] = []
    for source in sources:
        path = Path(source)
        if is_offline_run(path):
            runs += runs_from_offline([path])
        elif path.is_dir():
            found = [] if from_wandb else runs_from_results(path)
            if not found:
                offline = sorted({p.resolve() for p in path.rglob("offline-run-*") if is_offline_run(p)})
                found = runs_from_offline(offline)
            if not found:
                raise CompareError(f"{source}: no results.json and no W&B offline run (offline-run-*) below it")
            runs += found
        elif path.exists():
            raise CompareError(f"{source}: not a directory, a W&B offline run or an entity/project path")
        elif WANDB_PROJECT.fullmatch(source) and not source.startswith("."):
            runs += runs_from_wandb_project(source)
        else:
            raise CompareError(f"{source}: no such directory, and not a W&B project path entity/project")
    return clean(runs)


def clean(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Drop runs without results and true duplicates (same fingerprint: the same configuration
    run twice); runs that differ in any setting stay, labelled by the settings that differ."""
    notes, kept, seen = [], [], set()
    incomplete = [r["source"] for r in runs if any(r.get(k) is None for k in IDENTITY_KEYS)]
    if incomplete:
        notes.append(f"left out {len(incomplete)} run(s) without results (failed or still running), e.g. {incomplete[0]}")
    duplicates = 0
    for run in runs:
        if any(run.get(k) is None for k in IDENTITY_KEYS):
            continue
        # Runs written before fingerprints: the same identity and every same setting.
        key = run.get("fingerprint") or repr((tuple(str(run.get(k)) for k in (*IDENTITY_KEYS, "backbone", "study", "image_size", "tile_size")),
                                             sorted((k, repr(v)) for k, v in run.get("settings", {}).items())))
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(run)
    if duplicates:
        notes.append(f"left out {duplicates} duplicate run(s) (same configuration fingerprint)")
    if not kept:
        raise CompareError(f"no finished run among the {len(runs)} found" + (f": {notes[0]}" if notes else ""))
    keys = label_variants(kept)
    if keys:
        notes.append(f"runs differ in {', '.join(keys)}: one column per setting, named key=value")
    return kept, notes


# -- table math --------------------------------------------------------------------------------------
@dataclass
class Stat:
    """One metric of one table cell, as fractions in [0, 1]."""

    mean: float
    std: float | None  # None with a single seed
    n_seeds: int
    n_categories: int
    n_runs: int
    mark: int = 0  # BEST, SECOND or 0


def cell_stat(runs: list[dict], metric: str) -> Stat | None:
    """Mean over categories per seed, then mean ± sample std over seeds."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    categories = set()
    for run in runs:
        value = run.get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            by_seed[run["seed"]].append(float(value))
            categories.add(run["category"])
    if not by_seed:
        return None
    per_seed = [statistics.fmean(values) for values in by_seed.values()]
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else None
    return Stat(statistics.fmean(per_seed), std, len(per_seed), len(categories), sum(map(len, by_seed.values())))


@dataclass
class Table:
    """Rows (setup, or category and setup) x columns (models) x metrics."""

    dataset: str
    row_names: tuple[str, ...]
    rows: list[tuple[str, ...]]
    columns: list[str]
    cells: dict[tuple[tuple[str, ...], str, str], Stat] = field(default_factory=dict)

    def get(self, row, column, metric) -> Stat | None:
        return self.cells.get((row, column, metric))


def column_of(run: dict) -> str:
    """The model, and the settings in which it differs from runs of the same identity (Hydra's
    override-dirname style), e.g. ``padim (model.net.n_features=20)``."""
    return f"{run['model']} ({run['variant']})" if run.get("variant") else str(run["model"])


def build_table(runs: list[dict], dataset: str, per_category: bool = False) -> Table:
    runs = [r for r in runs if r["dataset"] == dataset]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        row = (str(run["category"]), str(run["setup"])) if per_category else (str(run["setup"]),)
        groups[row, column_of(run)].append(run)
    setups = paper_order({r["setup"] for r in runs}, PAPER_SETUPS)
    models = paper_order({r["model"] for r in runs}, PAPER_MODELS)
    columns = sorted({c for _, c in groups}, key=lambda c: (models.index(c.split(" (")[0]), c))
    if per_category:
        rows = [(c, s) for c in sorted({r["category"] for r in runs}) for s in setups if any((c, s) == k[0] for k in groups)]
    else:
        rows = [(s,) for s in setups]
    table = Table(dataset, ("category", "setup") if per_category else ("setup",), rows, columns)
    for (row, column), members in groups.items():
        for metric in TABLE_METRICS:
            stat = cell_stat(members, metric)
            if stat is not None:
                table.cells[row, column, metric] = stat
    mark_best(table)
    return table


def mark_best(table: Table) -> None:
    """Best and second best per column and metric, within each block of rows that compete
    (the whole table, or one category).  Values are compared as displayed (0.1 %), so ties share."""
    blocks: dict[tuple, list[tuple]] = defaultdict(list)
    for row in table.rows:
        blocks[row[:-1]].append(row)
    for rows in blocks.values():
        for column in table.columns:
            for metric in TABLE_METRICS:
                stats = [s for s in (table.get(r, column, metric) for r in rows) if s is not None]
                if len(stats) < 2:
                    continue
                ranked = sorted({round(100 * s.mean, 1) for s in stats}, reverse=True)
                for stat in stats:
                    shown = round(100 * stat.mean, 1)
                    stat.mark = BEST if shown == ranked[0] else SECOND if len(ranked) > 1 and shown == ranked[1] else 0


# -- output --------------------------------------------------------------------------------------------
def percent(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    text = f"{100 * stat.mean:.1f}"
    return text if stat.std is None else f"{text} ± {100 * stat.std:.1f}"


def markdown_value(stat: Stat | None) -> str:
    text = percent(stat)
    return f"**{text}**" if stat and stat.mark == BEST else f"_{text}_" if stat and stat.mark == SECOND else text


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def caption(table: Table, runs: list[dict]) -> str:
    runs = [r for r in runs if r["dataset"] == table.dataset]
    seeds = len({r["seed"] for r in runs})
    categories = len({r["category"] for r in runs})
    how = "per category" if "category" in table.row_names else f"averaged over {plural(categories, 'category', 'categories')}"
    return (f"{table.dataset}: image AUROC / pixel AUPRO in %, {how}, mean ± std over {plural(seeds, 'seed', 'seeds')} "
            f"({len(runs)} runs); best **bold**, second best _underlined_ per column")


def to_markdown(table: Table, runs: list[dict]) -> str:
    lines = [f"### {caption(table, runs)}", "", "| " + " | ".join([*table.row_names, *table.columns]) + " |",
             "|" + "---|" * len(table.row_names) + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = [" / ".join(markdown_value(table.get(row, c, m)) for m in TABLE_METRICS) for c in table.columns]
        lines.append("| " + " | ".join([*row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(table: Table) -> list[dict]:
    out = []
    for row in table.rows:
        for column in table.columns:
            for metric in TABLE_METRICS:
                stat = table.get(row, column, metric)
                if stat is None:
                    continue
                out.append({"dataset": table.dataset, **dict(zip(table.row_names, row)), "model": column, "metric": metric,
                            "mean_percent": round(100 * stat.mean, 3),
                            "std_percent": "" if stat.std is None else round(100 * stat.std, 3),
                            "n_seeds": stat.n_seeds, "n_categories": stat.n_categories, "n_runs": stat.n_runs,
                            "mark": {BEST: "best", SECOND: "second"}.get(stat.mark, "")})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def print_table(table: Table, runs: list[dict], console) -> None:
    from rich.table import Table as RichTable
    from rich.text import Text

    rich_table = RichTable(title=f"{table.dataset}: image AUROC / pixel AUPRO (%)" + (" per category" if len(table.row_names) > 1 else ""))
    for name in table.row_names:
        rich_table.add_column(name)
    for column in table.columns:
        rich_table.add_column(column, justify="right")
    styles = {BEST: "bold", SECOND: "underline"}
    for row in table.rows:
        cells = []
        for column in table.columns:
            text = Text()
            for i, metric in enumerate(TABLE_METRICS):
                stat = table.get(row, column, metric)
                text.append(" / " if i else "")
                text.append(percent(stat), style=styles.get(stat.mark, "") if stat else "")
            cells.append(text)
        rich_table.add_row(*row, *cells)
    console.print(rich_table)
    console.print(caption(table, runs).split(": ", 1)[1].replace("**bold**", "bold").replace("_underlined_", "underlined"))


def compare(sources: list[str], out: Path, datastats: Path | None = None, from_wandb: bool = False,
            baseline: str = significance.BASELINE) -> dict:
    """Everything the command does; returns {'runs', 'tables', 'files', 'notes'} for tests."""
    from rich.console import Console

    from tiled_hydra.analysis import figures

    console = Console(width=None if sys.stdout.isatty() else 160)  # piped output: no wrapped cells
    runs, notes = load_runs(sources, from_wandb)
    table_runs = [r for r in runs if r["study"] != RESOLUTION_STUDY]
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted({r["dataset"] for r in table_runs})
    tables = [build_table(table_runs, d) for d in datasets]
    per_category = [build_table(table_runs, d, per_category=True) for d in datasets]
    files = []
    for name, group in (("table", tables), ("per_category", per_category)):
        (out / f"{name}.md").write_text("\n".join(to_markdown(t, table_runs) for t in group))
        write_csv(out / f"{name}.csv", [row for t in group for row in csv_rows(t)])
        files += [out / f"{name}.md", out / f"{name}.csv"]
    for table in per_category + tables:  # the paper-style table last, where the eye lands
        print_table(table, table_runs, console)
    if not table_runs:
        notes.append("no runs for the tables (only resolution-study runs)")

    # Defect sizes: recorded by the runs themselves (defect_share), or measured by tiled_hydra.analysis.datastats.
    stats = {**figures.defect_sizes_from_runs(runs), **(figures.load_datastats(datastats) if datastats else {})}
    # How sure the numbers are, whether setups differ, and recall by defect size (significance.py)
    rows, interval_notes = significance.intervals(table_runs, baseline)
    notes += interval_notes
    if rows:
        (out / "intervals.md").write_text(significance.to_markdown(rows, baseline))
        write_csv(out / "intervals.csv", rows)
        files += [out / "intervals.md", out / "intervals.csv"]
    path, note = significance.recall_by_size(table_runs, out)
    files += [path] if path else []
    notes += [note] if note else []
    for draw in (figures.memory_per_setup, figures.resolution_study, figures.defect_size, figures.speed_per_setup):
        path, note = draw(runs, out, stats) if draw is figures.defect_size else draw(runs, out)
        if path:
            files.append(path)
        if note:
            notes.append(note)
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"{len(runs)} runs -> " + ", ".join(str(f) for f in files))
    return {"runs": runs, "tables": tables, "per_category": per_category, "files": files, "notes": notes}
