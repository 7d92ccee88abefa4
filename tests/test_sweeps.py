"""Sweeps and launchers: every sweep and launcher config composes; a real 2-process joblib sweep
runs, re-runs skipping finished jobs, and feeds `tiled_hydra.compare` (results.json and W&B offline)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, choices
from tiled_hydra.core.tiling import TileGrid

SWEEPS = [s for s in choices("sweep") if not s.startswith("_")]
PAPER_SETUPS = ["sm256", "sm512", "st4", "st9", "ens4", "ens9"]
PAPER_MODELS = ["padim", "patchcore", "fastflow", "reverse_distillation"]


def sweep_params(cfg) -> dict[str, list[str]]:
    return {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}


def test_the_expected_sweeps_exist():
    assert {"mvtec_grid", "visa_grid", "resolution_single", "resolution_ensemble", "smoke"} <= set(SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_with_job_dirs_named_by_overrides(compose_cfg, sweep):
    cfg = compose_cfg([f"+sweep={sweep}"], return_hydra_config=True)
    assert cfg.study
    assert sweep_params(cfg)
    # No job number in the directory name: a re-run finds its finished jobs again.
    assert "hydra.job.num" not in OmegaConf.to_yaml(cfg.hydra.sweep)
    assert "dataset.root" in cfg.hydra.job.config.override_dirname.exclude_keys


@pytest.mark.parametrize("sweep, dataset, categories", [("mvtec_grid", "mvtec", 15), ("visa_grid", "visa", 12)])
def test_paper_grids_are_the_papers(compose_cfg, sweep, dataset, categories):
    cfg = compose_cfg([f"+sweep={sweep}"], return_hydra_config=True)
    params = sweep_params(cfg)
    assert cfg.dataset.name == dataset and cfg.backbone.name == "resnet18"
    assert len(params["dataset.category"]) == categories
    assert params["+setup"] == PAPER_SETUPS
    assert params["model"] == PAPER_MODELS
    assert params["seed"] == ["0", "1", "2"]
    assert len(set(params["dataset.category"])) == categories


@pytest.mark.parametrize("sweep", ["mvtec_grid", "visa_grid", "smoke"])
def test_every_swept_setup_and_model_composes(compose_cfg, sweep):
    params = sweep_params(compose_cfg([f"+sweep={sweep}"], return_hydra_config=True))
    for setup in params["+setup"]:
        assert compose_cfg([f"+sweep={sweep}", f"+setup={setup}"]).setup.name == setup
    missing = [m for m in params["model"] if not (CONF_DIR / "model" / f"{m}.yaml").exists()]
    for model in sorted(set(params["model"]) - set(missing)):
        assert compose_cfg([f"+sweep={sweep}", f"model={model}"]).model.name == model
    if missing:
        pytest.skip(f"model configs not merged yet (issue 3): {', '.join(missing)}; the others compose")


@pytest.mark.parametrize("sweep, tiles, models", [
    ("resolution_single", [1, 1, 1, 1], [1, 1, 1, 1]),
    ("resolution_ensemble", [1, 4, 9, 16], [1, 4, 9, 16]),
])
def test_resolution_sweeps_follow_paper_fig6(compose_cfg, sweep, tiles, models):
    sizes = sweep_params(compose_cfg([f"+sweep={sweep}"], return_hydra_config=True))["setup.image_size"]
    assert sizes == ["256", "512", "768", "1024"]
    for size, n_tiles, n_models in zip(sizes, tiles, models):
        cfg = compose_cfg([f"+sweep={sweep}", f"setup.image_size={size}"])
        OmegaConf.resolve(cfg)
        grid = TileGrid.create(cfg.setup.image_size, cfg.setup.tile_size, cfg.setup.stride)
        assert grid.num_tiles == n_tiles
        assert (1 if cfg.setup.shared else grid.num_tiles) == n_models
        assert cfg.study == "resolution" and cfg.dataset.category == "pcb3" and cfg.model.name == "padim"
        assert cfg.setup.name == (f"sm{size}" if sweep == "resolution_single" else f"ens{size}_tile256")


LAUNCHERS = {
    # name: (plugin module, extra to install, checks)
    "local_parallel": ("hydra_plugins.hydra_joblib_launcher", None, {"n_jobs": 2}),
    "slurm_gpu": ("hydra_plugins.hydra_submitit_launcher", "slurm", {"gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 240}),
    # tiled_hydra's own Ray launcher: it imports Ray only when it launches
    "ray_cluster": ("hydra_plugins.tiled_hydra_ray", None, {"remote.num_gpus": 1, "address": "auto", "remote.max_calls": 1}),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_composes_and_instantiates(compose_cfg, launcher):
    module, extra, checks = LAUNCHERS[launcher]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed: pip install -e '.[{extra}]'")
    cfg = compose_cfg(["+sweep=smoke", f"hydra/launcher={launcher}"], return_hydra_config=True)
    for key, value in checks.items():
        assert OmegaConf.select(cfg.hydra.launcher, key) == value, key
    # Building the launcher checks every key against the plugin's schema; nothing is submitted.
    assert type(instantiate(cfg.hydra.launcher)).__name__.endswith("Launcher")


def sbatch_script(cfg, tmp_path, monkeypatch) -> str:
    """The sbatch file hydra_submitit_launcher would submit for ``cfg`` (composed with a SLURM launcher)."""
    submitit = pytest.importorskip("submitit", reason="pip install -e '.[slurm]'")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_srun = tmp_path / "bin" / "srun"  # submitit refuses to build a SLURM executor without srun on PATH
    fake_srun.parent.mkdir(exist_ok=True)
    fake_srun.write_text("#!/bin/sh\nexit 1\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}{os.pathsep}{os.environ['PATH']}")
    # The parameter mapping of hydra_submitit_launcher's SlurmLauncher.launch(), up to submission.
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m tiled_hydra", "uid")


def test_slurm_config_renders_an_sbatch_script_with_one_gpu(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="pip install -e '.[slurm]'")
    cfg = compose_cfg(["+sweep=smoke", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    script = sbatch_script(cfg, tmp_path, monkeypatch)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=240",
                 "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB"):
        assert line in script, line


# -- a real sweep -----------------------------------------------------------------------------------
# The smoke sweep with its two setups replaced by two that share one tiny geometry (64 px image,
# 32 px tiles): ST4 (one model for all tiles) and ENS4 (one per tile), PaDiM, seeds 0 and 1; W&B offline.
def tiny_smoke(data_root: Path) -> list[str]:
    return ["+sweep=smoke", "+setup=st4,ens4", "model=padim", "++setup.image_size=64", "++setup.tile_size=32",
            "++setup.stride=32", f"dataset.root={data_root}", "dataset.resolution=64", "dataset.n_train=6",
            "dataset.n_val=4", "dataset.n_test=6", "speed.enabled=true", "speed.warmup=1", "speed.repeats=2",
            "speed.batch_size=2", "report.overlays=1"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Four jobs through Hydra's joblib launcher, two worker processes at a time (a real process boundary;
    the sweep itself is started in this process, as the shell would, and its output captured)."""
    from tests.conftest import main_command

    root = tmp_path_factory.mktemp("sweep")
    ran = main_command(["-m", "hydra/launcher=local_parallel", *tiny_smoke(root / "data"),
                        f"hydra.sweep.dir={root / 'multirun'}"])
    assert ran.code == 0, ran.err[-3000:]
    return root / "multirun", ran, root / "data"


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_in_parallel(tiny_sweep):
    sweep_dir, ran, _ = tiny_sweep
    log = ran.out + ran.err
    assert "Joblib.Parallel(n_jobs=2" in log and "launching 4 jobs" in log
    jobs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert len(jobs) == 4
    # Job directories are named by overrides (no job number), so re-runs find them again.
    assert {("+setup=st4" in j.name, "seed=1" in j.name) for j in jobs} == {(a, b) for a in (True, False) for b in (True, False)}
    # Two jobs ran at the same time: their [start, end] intervals overlap.
    spans = sorted(((j / ".hydra" / "config.yaml").stat().st_mtime, (j / "results.json").stat().st_mtime) for j in jobs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert len({json.loads((j / "results.json").read_text())["fingerprint"] for j in jobs}) == 4


def compare_cli(call, *args: str):
    from tiled_hydra.cli.compare import main

    ran = call(main, list(args))
    assert ran.code == 0, ran.err[-3000:]
    return ran


def check_compare_output(out: Path, printed: str, runs: list[dict]) -> None:
    assert "synthetic: image AUROC / pixel AUPRO (%)" in printed
    assert "st4" in printed and "ens4" in printed and "padim" in printed
    for name in ("table.md", "table.csv", "per_category.md", "per_category.csv", "fig5_memory.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "| st4 |" in table and "| ens4 |" in table and " ± " in table
    assert "Fig. 6 skipped" in printed  # both setups share one image size: no resolution curve
    # Figures 7 and 8 exist exactly when the runs recorded their data (defect_share, latency_ms).
    assert (out / "fig7_defect_size.png").exists() == all("defect_share" in r for r in runs)
    assert (out / "fig8_latency_throughput.png").exists() == all("latency_ms" in r for r in runs)
    assert all("latency_ms" in r for r in runs)  # speed.enabled=true in every job


@pytest.mark.slow
def test_compare_reads_the_sweep_from_results_json(call, tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    sweep_dir, _, _ = tiny_sweep
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    ran = compare_cli(call, f"sources={sweep_dir}", f"out={tmp_path}")
    check_compare_output(tmp_path, ran.out, runs)
    assert "4 runs" in ran.out


@pytest.mark.slow
def test_compare_reads_the_same_sweep_from_wandb_offline_runs(call, tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    sweep_dir, _, _ = tiny_sweep
    offline = sorted(str(p) for p in sweep_dir.glob("*/wandb/offline-run-*"))
    assert len(offline) == 4
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    # job directory names hold '=' and ',': quoted, as on the command line
    ran = compare_cli(call, "sources=[" + ",".join(f"'{path}'" for path in offline) + "]", f"out={tmp_path / 'from_dirs'}")
    check_compare_output(tmp_path / "from_dirs", ran.out, runs)
    # The same tables as from results.json.
    compare_cli(call, f"sources={sweep_dir}", f"out={tmp_path / 'reference'}")
    assert (tmp_path / "from_dirs" / "table.csv").read_text() == (tmp_path / "reference" / "table.csv").read_text()
    # from_wandb=true on the multirun directory reads the same offline runs.
    compare_cli(call, f"sources={sweep_dir}", "from_wandb=true", f"out={tmp_path / 'from_flag'}")
    assert (tmp_path / "from_flag" / "table.csv").read_text() == (tmp_path / "reference" / "table.csv").read_text()


@pytest.mark.slow
def test_rerun_skips_finished_jobs_and_runs_the_missing_one(main_cli, tiny_sweep):
    # The same sweep again, in this process (Hydra's basic launcher, no W&B: neither is part of a
    # job's name or fingerprint): the three finished jobs are read back, the missing one runs.
    sweep_dir, _, data_root = tiny_sweep
    jobs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    finished = {j: (j / "results.json").stat().st_mtime_ns for j in jobs[1:]}
    (jobs[0] / "results.json").unlink()  # as if this job had died
    ran = main_cli(["-m", "hydra/launcher=basic", "logger=none", *tiny_smoke(data_root), f"hydra.sweep.dir={sweep_dir}"])
    assert ran.code == 0, ran.err[-3000:]
    assert ran.out.count("read, not recomputed") == 3
    assert (jobs[0] / "results.json").exists()
    assert {j: (j / "results.json").stat().st_mtime_ns for j in jobs[1:]} == finished
