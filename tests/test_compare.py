"""`tiled_hydra.compare` on hand-made results with known values; `tiled_hydra.datastats` on a tiny tree.

The real sweep -> compare path (results.json and W&B offline runs) is in test_sweeps.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import assert_one_line, write_mvtec
from tiled_hydra.analysis import compare as cmp

# image AUROC per (setup, model, category, seed); pixel AUPRO = AUROC - 0.1 everywhere.
AUROC = {
    ("sm256", "padim"): {"a": (0.80, 0.82), "b": (0.90, 0.92)},  # seed means 0.85, 0.87 -> 86.0 ± 1.4
    ("ens9", "padim"): {"a": (0.90, 0.90), "b": (0.96, 0.98)},  # 0.93, 0.94 -> 93.5 ± 0.7 (best)
    ("st4", "padim"): {"a": (0.70, 0.70), "b": (0.70, 0.70)},  # 70.0 ± 0.0
    ("sm256", "patchcore"): {"a": (0.95, 0.95), "b": (0.95, 0.95)},  # 95.0 (tie: both best)
    ("ens9", "patchcore"): {"a": (0.95, 0.95), "b": (0.95, 0.95)},
    ("st4", "patchcore"): {"a": (0.90, 0.90), "b": (0.90, 0.90)},  # second best
}


GEOMETRY = {"sm256": (256, 256, 256), "sm512": (512, 512, 512), "st4": (512, 256, 256), "st9": (512, 256, 128),
            "ens4": (512, 256, 256), "ens9": (512, 256, 128)}  # image, tile, stride


def setup_config(setup: str, study: str = "paper_grid") -> dict:
    image, tile, stride = GEOMETRY[setup]
    return {"setup": {"name": setup, "image_size": image, "tile_size": tile, "stride": stride}, "study": study}


def fake_run(setup: str, model: str, category: str, seed: int, auroc: float, **extra) -> dict:
    return {
        "image_AUROC": auroc, "pixel_AUPRO": round(auroc - 0.1, 6), "pixel_AUROC": auroc, "image_F1": 0.5, "pixel_F1": 0.5,
        "train_peak_mem_bytes": (100 + 10 * len(setup)) * 2**20, "infer_peak_mem_bytes": 50 * 2**20, "mem_kind": "rss",
        "train_seconds": 1.0, "infer_seconds": 1.0, "infer_images_per_second": 10.0,
        "num_tiles": 9 if setup.endswith("9") else 4 if setup.endswith("4") else 1,
        "num_models": 9 if setup == "ens9" else 1, "setup": setup, "model": model, "backbone": "resnet18",
        "dataset": "mvtec", "category": category, "seed": seed, **extra,
    }


def write_job(root: Path, results: dict, config: dict | None = None, tag: str = "") -> Path:
    name = ",".join(f"{k}={results[k]}" for k in ("setup", "model", "category", "seed"))
    job = root / f"{name},{tag}"
    (job / ".hydra").mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(results))
    if config is not None:
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return job


@pytest.fixture
def hand_made(tmp_path) -> Path:
    root = tmp_path / "multirun"
    for (setup, model), by_category in AUROC.items():
        for category, values in by_category.items():
            for seed, value in enumerate(values):
                write_job(root, fake_run(setup, model, category, seed, value), setup_config(setup))
    # Resolution-study runs must stay out of the tables even though their setup is named sm256.
    for size in (512, 1024):
        write_job(root, fake_run("sm256", "padim", "a", 0, 0.10),
                  {"setup": {"name": "sm256", "image_size": size, "tile_size": "${setup.image_size}"}, "study": "resolution"},
                  tag=f"r{size}")
    return root


def test_table_mean_std_over_seeds_and_marks(hand_made, tmp_path):
    result = cmp.compare([str(hand_made)], tmp_path / "out")
    (table,) = result["tables"]
    assert table.rows == [("sm256",), ("st4",), ("ens9",)]  # paper order, only the setups present
    assert table.columns == ["patchcore", "padim"]  # paper column order

    sm = table.get(("sm256",), "padim", "image_AUROC")
    assert sm.mean == pytest.approx(0.86) and sm.std == pytest.approx(0.0141421, abs=1e-6)
    assert (sm.n_seeds, sm.n_categories, sm.n_runs) == (2, 2, 4)
    assert cmp.percent(sm) == "86.0 ± 1.4"
    assert table.get(("sm256",), "padim", "pixel_AUPRO").mean == pytest.approx(0.76)

    marks = {row[0]: table.get(row, "padim", "image_AUROC").mark for row in table.rows}
    assert marks == {"ens9": cmp.BEST, "sm256": cmp.SECOND, "st4": 0}
    marks = {row[0]: table.get(row, "patchcore", "image_AUROC").mark for row in table.rows}
    assert marks == {"sm256": cmp.BEST, "ens9": cmp.BEST, "st4": cmp.SECOND}  # a tie shares the mark

    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| ens9 | **95.0 ± 0.0** / **85.0 ± 0.0** | **93.5 ± 0.7** / **83.5 ± 0.7** |" in markdown
    assert "| st4 | _90.0 ± 0.0_ / _80.0 ± 0.0_ | 70.0 ± 0.0 / 60.0 ± 0.0 |" in markdown
    assert "| sm256 | **95.0 ± 0.0** / **85.0 ± 0.0** | _86.0 ± 1.4_ / _76.0 ± 1.4_ |" in markdown

    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    row = next(r for r in rows if r["setup"] == "sm256" and r["model"] == "padim" and r["metric"] == "image_AUROC")
    assert float(row["mean_percent"]) == pytest.approx(86.0) and float(row["std_percent"]) == pytest.approx(1.414, abs=1e-3)
    assert row["mark"] == "second" and row["n_runs"] == "4"


def test_per_category_table_marks_within_each_category(hand_made, tmp_path):
    result = cmp.compare([str(hand_made)], tmp_path / "out")
    (table,) = result["per_category"]
    assert table.rows[:3] == [("a", "sm256"), ("a", "st4"), ("a", "ens9")]
    a_sm = table.get(("a", "sm256"), "padim", "image_AUROC")
    assert a_sm.mean == pytest.approx(0.81) and a_sm.std == pytest.approx(0.0141421, abs=1e-6)
    assert table.get(("a", "ens9"), "padim", "image_AUROC").mark == cmp.BEST
    assert table.get(("b", "ens9"), "padim", "image_AUROC").mark == cmp.BEST
    text = (tmp_path / "out" / "per_category.md").read_text()
    assert "| a | sm256 |" in text and "| b | ens9 |" in text


def test_figures_from_hand_made_runs_and_skips_with_notes(hand_made, tmp_path):
    result = cmp.compare([str(hand_made)], tmp_path / "out")
    names = {Path(f).name for f in result["files"]}
    assert {"fig5_memory.png", "fig6_resolution.png"} <= names  # memory in every run; one resolution run
    notes = " ".join(result["notes"])
    assert "Fig. 7 skipped" in notes and "datastats" in notes
    assert "Fig. 8 skipped" in notes and "latency_ms" in notes
    assert not (tmp_path / "out" / "fig8_latency_throughput.png").exists()


def test_all_four_figures_with_speed_and_defect_sizes(tmp_path):
    root = tmp_path / "multirun"
    for setup in ("sm256", "ens4", "ens9"):
        for category in ("a", "b", "c"):
            write_job(root, fake_run(setup, "padim", category, 0, 0.9, latency_ms=12.0, throughput_images_per_second=80.0,
                                     throughput_batch_size=8), setup_config(setup))
    for size in (256, 512):
        for setup, tile in ((f"sm{size}", size), (f"ens{size}_tile256", 256)):
            write_job(root, fake_run(setup, "padim", "a", 0, 0.8),
                      {"setup": {"name": setup, "image_size": size, "tile_size": tile, "stride": tile}, "study": "resolution"},
                      tag=f"res{size}")
    stats = tmp_path / "datastats.json"
    stats.write_text(json.dumps({f"mvtec/{c}": {"dataset": "mvtec", "category": c, "defect_share": s}
                                 for c, s in (("a", 0.002), ("b", 0.02), ("c", 0.1))}))
    result = cmp.compare([str(root)], tmp_path / "out", datastats=stats)
    names = sorted(Path(f).name for f in result["files"] if str(f).endswith(".png"))
    assert names == ["fig5_memory.png", "fig6_resolution.png", "fig7_defect_size.png", "fig8_latency_throughput.png"]
    # hand-made results carry no per-image records or region recall: compare says so, and nothing else
    assert [n for n in result["notes"] if "per_image.npz" not in n and "region_recall_by_size" not in n] == []


def test_figures_6_and_7_from_the_grid_runs_alone(tmp_path):
    # No resolution sweep: SM256 (256 px) and ENS4 (512 px) give Fig. 6; the runs' defect_share gives Fig. 7.
    root = tmp_path / "multirun"
    for setup in ("sm256", "ens4"):
        for category, share in (("a", 0.002), ("b", 0.02), ("c", 0.1)):
            write_job(root, fake_run(setup, "padim", category, 0, 0.9, defect_share=share), setup_config(setup))
    from tiled_hydra.analysis import figures

    runs, _ = cmp.load_runs([str(root)])
    assert figures.defect_sizes_from_runs(runs) == {("mvtec", "a"): 0.002, ("mvtec", "b"): 0.02, ("mvtec", "c"): 0.1}
    assert {figures.resolution_series(r) for r in runs} == {"padim, single model", "padim, tiled ensemble (256 px tiles, stride 256)"}
    result = cmp.compare([str(root)], tmp_path / "out")
    names = {Path(f).name for f in result["files"]}
    assert {"fig6_resolution.png", "fig7_defect_size.png"} <= names


def test_unreadable_or_failed_runs_are_left_out_with_a_note(hand_made, tmp_path):
    damaged = tmp_path / "wandb" / "offline-run-20240101_000000-abc"
    damaged.mkdir(parents=True)
    (damaged / "run-abc.wandb").write_bytes(b":W&B garbage")
    write_job(tmp_path / "failed", {"setup": "sm256", "model": "padim", "category": "a", "seed": 0})  # no metrics
    result = cmp.compare([str(hand_made), str(damaged), str(tmp_path / "failed")], tmp_path / "out")
    assert any("left out 2 run(s) without results" in n for n in result["notes"])
    assert len(result["runs"]) == 26  # the hand-made ones: 24 grid + 2 resolution
    with pytest.raises(cmp.CompareError, match="no finished run"):
        cmp.load_runs([str(damaged)])


@pytest.mark.parametrize("source, message", [
    ("/does/not/exist", "no such directory"),
    ("EMPTY", "no results.json and no W&B offline run"),
    ("nobody/no_project", "cannot read W&B project nobody/no_project"),
])
def test_bad_source_is_one_line(call, tmp_path, source, message):
    from tiled_hydra.cli.compare import main

    if source == "EMPTY":
        source = str(tmp_path)
    ran = call(main, [f"sources={source}", f"out={tmp_path / 'out'}"])
    assert_one_line(ran.code, ran.err, message, expected_code=2)


@pytest.mark.parametrize("args, message", [
    ([], "sources"),  # required
    (["sources"], "is not key=value"),
    (["sources=x", "colour=red"], "colour"),
])
def test_compare_usage_errors_are_one_line(call, args, message):
    from tiled_hydra.cli.compare import main

    ran = call(main, args)
    assert_one_line(ran.code, ran.err, message, expected_code=2)
    assert ran.err.startswith("tiled_hydra.compare: error:")


def test_compare_help_lists_its_options(call):
    from tiled_hydra.cli.compare import main

    ran = call(main, ["--help"])
    assert ran.code == 0 and ran.out.startswith("usage: tiled-hydra-compare")
    for key in ("sources:", "out:", "datastats:", "from_wandb:", "baseline:"):
        assert key in ran.out, key


def test_datastats_defect_share_of_a_tiny_tree(call, tmp_path):
    from tiled_hydra.cli.datastats import main

    # write_mvtec: 3 defective 64x64 images, each with one 8x8 defect -> 64 / 4096 = 1.5625 %.
    root = write_mvtec(tmp_path / "data", n_train=2, n_good=1, n_bad=3)
    out = tmp_path / "stats.json"
    ran = call(main, ["dataset=mvtec", f"dataset.root={root}", "dataset.category=widget", "image_size=64", f"out={out}"])
    assert ran.code == 0, ran.err
    entry = json.loads(out.read_text())["mvtec/widget"]
    assert entry["defect_share"] == pytest.approx(64 / 4096)
    assert entry["defective_images"] == 3
    assert f"written: {out}" in ran.out
    assert cmp_figures_stats(out) == {("mvtec", "widget"): pytest.approx(64 / 4096)}


def test_datastats_measures_several_categories_and_merges_into_the_file(call, tmp_path):
    from tiled_hydra.cli.datastats import main

    root = write_mvtec(tmp_path / "data", category="a", n_train=2, n_good=1, n_bad=2)
    write_mvtec(root, category="b", n_train=2, n_good=1, n_bad=1)
    out = tmp_path / "stats.json"
    out.write_text(json.dumps({"visa/x": {"dataset": "visa", "category": "x", "defect_share": 0.5}}))
    ran = call(main, ["dataset=mvtec", f"dataset.root={root}", "dataset.category=[a,b]", "image_size=64", f"out={out}"])
    assert ran.code == 0, ran.err
    stats = json.loads(out.read_text())
    assert set(stats) == {"visa/x", "mvtec/a", "mvtec/b"}  # merged, not overwritten
    assert stats["mvtec/a"]["defective_images"] == 2 and stats["mvtec/b"]["defective_images"] == 1


@pytest.mark.parametrize("args, message, code", [
    (["image_size=4"], "image_size=4", 2),
    (["dataset=mvtec", "dataset.root=/does/not/exist", "dataset.category=a"], "/does/not/exist", 1),
])
def test_datastats_errors_are_one_line(call, tmp_path, args, message, code):
    from tiled_hydra.cli.datastats import main

    ran = call(main, [*args, f"out={tmp_path / 'stats.json'}"])
    assert_one_line(ran.code, ran.err, message, expected_code=code)
    assert not (tmp_path / "stats.json").exists()


def cmp_figures_stats(path: Path) -> dict:
    from tiled_hydra.analysis.figures import load_datastats

    return load_datastats(path)


# -- runs that differ in other settings ------------------------------------------------------------------
def variant_config(n_features: int, score: str = "mean") -> dict:
    return {**setup_config("sm256"), "model": {"name": "padim", "net": {"n_features": n_features}}, "merge": {"score": score},
            "logger": {"mode": "offline"}}


def test_runs_differing_in_a_setting_get_their_own_column(tmp_path):
    root = tmp_path / "multirun"
    write_job(root, fake_run("sm256", "padim", "a", 0, 0.80, fingerprint="f20"), variant_config(20), tag="20")
    write_job(root, fake_run("sm256", "padim", "a", 0, 0.90, fingerprint="f100"), variant_config(100), tag="100")
    # The same configuration run twice (same fingerprint) is the only true duplicate.
    write_job(root, fake_run("sm256", "padim", "a", 0, 0.90, fingerprint="f100"), variant_config(100), tag="100again")
    # A different logger changes no result and names no column.
    write_job(root, fake_run("sm256", "patchcore", "a", 0, 0.70, fingerprint="pc"), {**setup_config("sm256"), "logger": {"mode": "online"}})
    result = cmp.compare([str(root)], tmp_path / "out")
    table = result["tables"][0]
    assert table.columns == ["patchcore", "padim (model.net.n_features=100)", "padim (model.net.n_features=20)"]
    assert table.get(("sm256",), "padim (model.net.n_features=20)", "image_AUROC").mean == pytest.approx(0.80)
    assert table.get(("sm256",), "padim (model.net.n_features=100)", "image_AUROC").mean == pytest.approx(0.90)
    assert "left out 1 duplicate run(s) (same configuration fingerprint)" in result["notes"]
    assert len(result["runs"]) == 3


def test_real_sweep_over_an_evaluation_setting_keeps_both_runs(main_cli, trained_run, tiny, tmp_path):
    """A real multirun over merge.score (both jobs evaluate the cached ENS4 run's slots, shared through
    ensemble.checkpoint_dir): two configurations, two columns; a copy of a job is the one duplicate."""
    import shutil

    cached = trained_run("padim", "ens4")
    sweep = tmp_path / "sweep"
    ran = main_cli(["-m", *tiny.canonical("ens4"), "merge=default,max", "ensemble.stage=evaluate",
                    f"ensemble.checkpoint_dir={cached.run_dir / 'checkpoints'}", f"hydra.sweep.dir={sweep}"])
    assert ran.code == 0, ran.err[-3000:]
    jobs = sorted(p.parent for p in sweep.rglob("results.json"))  # job dirs nest: dataset.root is a path
    assert len(jobs) == 2
    scores = {json.loads((j / "results.json").read_text())["merge_score"]: j for j in jobs}
    assert json.loads((scores["mean"] / "results.json").read_text())["image_AUROC"] == cached.results["image_AUROC"]
    shutil.copytree(jobs[0], sweep / "copy_of_first_job", ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    result = cmp.compare([str(sweep)], tmp_path / "out")
    columns = result["tables"][0].columns
    assert len(columns) == 2 and any("merge.score=max" in c for c in columns), columns
    assert "left out 1 duplicate run(s) (same configuration fingerprint)" in result["notes"]
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert all(c in markdown for c in columns)


def test_intervals_and_paired_significance_from_per_image_records(tmp_path):
    """compare reads each run's per_image.npz: a perfect ENS9 against a coin-flip SM256 on the same
    40 images differs by exactly +50 pp in every draw (significant); an identical ranking by 0 (not)."""
    import numpy as np

    from tiled_hydra.metrics.bootstrap import PER_IMAGE_FILE, save_per_image

    root = tmp_path / "multirun"
    labels = np.array([0] * 20 + [1] * 20)
    paths = [f"img_{i:02d}.png" for i in range(40)]
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=40) + labels
    scores = {("sm256", "padim"): np.zeros(40), ("ens9", "padim"): labels.astype(float),
              ("sm256", "patchcore"): noisy, ("ens9", "patchcore"): 2 * noisy + 1}
    for (setup, model), values in scores.items():
        ties = 0.5 if not values.any() else None
        auroc = ties or float(((values[20:, None] > values[None, :20]).mean()))
        job = write_job(root, fake_run(setup, model, "a", 0, auroc, region_recall_by_size={"<0.01%": 0.5, ">=1%": 1.0}),
                        setup_config(setup))
        save_per_image(job / PER_IMAGE_FILE, paths, labels, values, None)
    result = cmp.compare([str(root)], tmp_path / "out")
    text = (tmp_path / "out" / "intervals.md").read_text()
    rows = {(r["model"], r["setup"], r["metric"]): r for r in csv.DictReader((tmp_path / "out" / "intervals.csv").open())}
    gap = rows["padim", "ens9", "image_AUROC"]
    assert (float(gap["diff"]), float(gap["diff_low"]), float(gap["diff_high"])) == (0.5, 0.5, 0.5) and gap["significant"] == "True"
    same = rows["patchcore", "ens9", "image_AUROC"]
    assert float(same["diff"]) == 0.0 and same["significant"] == "False"
    assert "+50.0 †" in text and ("patchcore", "ens9", "pixel_AUPRO") not in rows  # no masks recorded: no pixel rows
    assert tmp_path / "out" / "region_recall_by_size.png" in result["files"]
