"""Bad inputs to the main command end in one line naming the key, exit code 2, before anything loads.

Every case runs the real command (``tiled_hydra.cli.train.cli``) in this process, through Hydra's
composition of the project's conf/. The ranges come from the constructors (``typing.Annotated``
metadata read from their source), so the tests below also check that this reading equals Python's,
and that the static facts the check relies on (backbone channels, Lightning's arguments) are true.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from tests.helpers import loggers_restored
from tiled_hydra.cli.train import cli
from tiled_hydra.config import PRECISIONS, TRAINER_ARGUMENTS, source_signature

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def run_cli(args: list[str], run_dir: Path | None = None) -> int:
    """Exit code of ``python -m tiled_hydra ARGS [hydra.run.dir=RUN_DIR]``, run in this process. Hydra
    points the loggers at this job's console and log file; they are put back afterwards."""
    code = 0
    with loggers_restored():
        try:
            cli([*args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code


# (overrides, the key the one line must name). 176 = 24 + 40 + 112: the channels of EfficientNet-Lite0's
# stages 1, 2, 3, the default backbone and PaDiM's default layers.
COMMON = [
    (["model.net.n_features=-5"], "model.net.n_features"),  # negative slicing kept all but 5 channels
    (["model.net.n_features=177"], "model.net.n_features"),  # one more than the 176 channels
    (["setup.image_size=[512,512,3]"], "setup.image_size"),
    (["setup.image_size=[0]"], "setup.image_size"),
    (["setup.image_size=[]"], "setup.image_size"),
    (["setup.tile_size=-256"], "setup.tile_size"),
    (["setup.tile_size=1024"], "setup.tile_size"),  # larger than the 512 px image
    (["setup.stride=0"], "setup.stride"),
    (["setup.stride=[128,300]"], "setup.stride"),  # wider than the 256 px tile: pixels skipped
    (["seed=-1"], "seed"),
    (["model.batch_size=0"], "model.batch_size"),
    (["model.max_epochs=0"], "model.max_epochs"),
    (["model.max_steps=0"], "model.max_steps"),
    (["merge.seam_smoothing.sigma=-1"], "merge.seam_smoothing.sigma"),
    (["merge.calibration=global"], "merge.calibration"),
    (["merge.window=square"], "merge.window"),
    (["merge.seam_smoothing.width_fraction=0.7"], "merge.seam_smoothing.width_fraction"),
    (["metrics.aupro_fpr_limit=1.5"], "metrics.aupro_fpr_limit"),
    (["metrics.region_overlap=0"], "metrics.region_overlap"),
    (["metrics.resolution=-1"], "metrics.resolution"),
    (["report.overlays=-1"], "report.overlays"),
    (["report.maps=tiff"], "report.maps"),
    (["metrics.region_fprs=[0.5,2]"], "metrics.region_fprs"),
    (["metrics.region_fprs=[]"], "metrics.region_fprs"),
    (["speed.warmup=-1"], "speed.warmup"),
    (["speed.repeats=0"], "speed.repeats"),
    (["speed.batch_size=0"], "speed.batch_size"),
    (["inference.backbone_chunk_pixels=0"], "inference.backbone_chunk_pixels"),
    (["inference.mode=fast"], "inference.mode"),
    (["inference.features=whole_image", "setup.stride=120"], "setup.stride"),  # not a multiple of stage 3's 16
    (["backbone.weights=/no/such/file.pth"], "backbone.weights"),
    (["backbone.weights_package=no_such_weights_package"], "backbone.weights_package"),
    (["ensemble.workers=0"], "ensemble.workers"),
    (["ensemble.num_shards=0"], "ensemble.num_shards"),
    (["dataset.n_train=1"], "dataset.n_train"),
    (["dataset.val_defective_fraction=1.5"], "dataset.val_defective_fraction"),
    (["dataset.resolution=32"], "dataset.resolution"),
    (["dataset.seed=-3"], "dataset.seed"),
    (["dataset=folder", "dataset.root=/tmp", "dataset.normal_test_split=1"], "dataset.normal_test_split"),
    (["trainer.precision=17"], "trainer.precision"),
    (["trainer.devices=2"], "trainer.devices"),
    (["+trainer.nonsense=1"], "trainer.nonsense"),
    (["+model.net.nonsense=1"], "model.net.nonsense"),
]
# One or more per model and numeric key: the constraint each torch_model relies on.
PER_MODEL = {
    "padim": [("n_features=0", "n_features"), ("epsilon=0", "epsilon"), ("blur_sigma=-1", "blur_sigma"),
              ("layers=[1,2,5]", "layers"), ("layers=[3,1]", "layers")],
    "padim_ipca": [("k=0", "k"), ("k=177", "k"), ("step=0", "step"), ("n_features=0", "n_features"),
                   ("variance_rtol=1", "variance_rtol"), ("blur_sigma=-1", "blur_sigma"), ("dtype=float16", "dtype")],
    "patchcore": [("pool_size=4", "pool_size"), ("coreset_ratio=0", "coreset_ratio"), ("coreset_ratio=1.5", "coreset_ratio"),
                  ("projection_dim=-1", "projection_dim"), ("num_neighbors=0", "num_neighbors"), ("blur_sigma=-1", "blur_sigma")],
    "fastflow": [("flow_steps=0", "flow_steps"), ("hidden_ratio=0", "hidden_ratio"), ("clamp=-1", "clamp"),
                 ("lr=0", "lr"), ("weight_decay=-1", "weight_decay")],
    "reverse_distillation": [("blocks=0", "blocks"), ("blur_sigma=-2", "blur_sigma"), ("lr=-0.1", "lr"),
                             ("betas=[0.5,1.0]", "betas"), ("betas=[0.5]", "betas")],
    "ddad": [("start=1000", "start"), ("skip=0", "skip"), ("eta=1.5", "eta"), ("beta_start=0", "beta_start"),
             ("beta_end=0.00001", "beta_end"), ("diffusion_steps=0", "diffusion_steps"), ("da_steps=301", "da_steps"),
             ("train_crop=48", "train_crop"), ("lr=0", "lr"), ("da_lr=0", "da_lr"), ("weight_decay=-1", "weight_decay"),
             ("w=-1", "w"), ("v=-1", "v"), ("blur_sigma=-1", "blur_sigma"), ("sizes.small.heads=0", "sizes.small.heads"),
             ("sizes.small.dropout=1", "sizes.small.dropout"), ("min_channels=0", "min_channels"),
             ("map_layers=[4]", "map_layers"), ("noise_seed=-1", "noise_seed"), ("w_da=-1", "w_da"),
             ("da_lambda=-0.1", "da_lambda"), ("layers_per_block=0", "layers_per_block"),
             ("halving_period=0", "halving_period"), ("attention_resolution=-8", "attention_resolution")],
    "efficient_ad": [("crop_size=32", "crop_size"), ("crops_per_tile=0", "crops_per_tile"),
                     ("hard_quantile=1.5", "hard_quantile"), ("ae_jitter=1", "ae_jitter"), ("dropout=1", "dropout"),
                     ("quantile_holdout=1", "quantile_holdout"), ("min_holdout=0", "min_holdout"),
                     ("map_quantiles=[0.995,0.9]", "map_quantiles"), ("lr=0", "lr"), ("lr_drop_at=0", "lr_drop_at"),
                     ("weight_decay=-1", "weight_decay"),
                     ("penalty_images=0", "penalty_images"), ("distill.steps=0", "distill.steps"),
                     ("distill.lr=0", "distill.lr"), ("distill.crop_size=16", "distill.crop_size"),
                     ("teacher=/no/such/teacher.pth", "teacher"), ("penalty_dir=/no/such/folder", "penalty_dir")],
}
CASES = [pytest.param(args, key, id=" ".join(args)) for args, key in COMMON] + [
    pytest.param([f"model={model}", f"model.net.{override}"], f"model.net.{key}", id=f"{model} {override}")
    for model, cases in PER_MODEL.items() for override, key in cases
]


@pytest.mark.parametrize("args, key", CASES)
def test_a_bad_input_is_one_line_naming_its_key(tmp_path, capsys, args, key):
    code = run_cli(["+setup=ens9", "logger=none", *args], tmp_path / "run")
    out, err = capsys.readouterr()
    assert code == 2
    assert "to resume" not in out + err  # a refused run has nothing to resume
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"tiled_hydra: error: {key}") and ("expected" in err or "not a " in err), err
    assert not (tmp_path / "run").exists()  # a job that failed before doing anything leaves no run dir


@pytest.mark.parametrize("model", sorted(PER_MODEL))
def test_every_numeric_key_of_a_model_has_a_case_and_its_defaults_pass(model):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tiled_hydra.config import validate

    net = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())["net"]
    numeric = {k for k, v in net.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= {key.split(".")[0] for _, key in PER_MODEL[model]}, "a numeric key without a case"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for setup in ("ens9", "sm512"):  # the smallest and the largest tiles of the paper's setups
            validate(compose("config", overrides=[f"+setup={setup}", f"model={model}"]))
    GlobalHydra.instance().clear()


def test_the_check_comes_before_the_data(tmp_path, capsys):
    """A missing dataset folder would fail the run (exit 1) once data loads; the bad n_features is
    reported instead, so the check ran before any data or model loaded."""
    missing = tmp_path / "no such folder"
    code = run_cli(["+setup=ens9", "logger=none", "dataset=folder", f"dataset.root={missing}",
                    "model.net.n_features=-5"], tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tiled_hydra: error: model.net.n_features=-5: expected an integer in [1, 176]")
    assert len(err.splitlines()) == 1
    # and without the bad key, the same command gets past the check and fails on the data (exit 1)
    code = run_cli(["+setup=sm256", "logger=none", "dataset=folder", f"dataset.root={missing}"], tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 1 and str(missing) in err and len(err.splitlines()) == 1


def test_the_printed_resume_command_pastes_back(tmp_path, capsys):
    """A run dir with a space and a non-ASCII letter: the logged resume command, split as a POSIX
    shell splits it, is the same command (it names the same run dir)."""
    run_dir = tmp_path / "my runs" / "é"
    # a run that passes the config check and then fails at once (on its data: exit 1)
    args = ["+setup=sm256", "logger=none", "dataset=folder", f"dataset.root={tmp_path / 'no such folder'}"]
    assert run_cli(args, run_dir) == 1
    out = capsys.readouterr().out
    resume = out.split("to resume an interrupted run: ")[1].splitlines()[0]
    words = shlex.split(resume)
    assert words[:3] == ["python", "-m", "tiled_hydra"] and words[3:] == [*args, f"hydra.run.dir={run_dir}"]
    assert run_cli(words[3:]) == 1  # the pasted command parses and names the same run dir
    assert f"run dir: {run_dir};" in capsys.readouterr().out


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    assert run_cli(["+setup=ens9", "logger=none"], tmp_path / "a file" / "run") == 1
    assert capsys.readouterr().err == f"tiled_hydra: error: {tmp_path / 'a file' / 'run'}: Not a directory\n"


# -- the static facts the check relies on --------------------------------------------------------------------
def targets() -> list[str]:
    out = []
    for group in ("model", "dataset"):
        for path in sorted((CONF / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text())
            out.append((node.get("net") or node)["_target_"])
    return out


@pytest.mark.parametrize("target", targets())
def test_annotations_read_from_the_source_equal_pythons(target):
    """What config.check_target reads without importing a target equals the imported target's hints:
    no range is silently lost (an annotation naming something the source reading cannot resolve)."""
    import importlib
    import inspect

    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    imported = typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj, include_extras=True)
    read = source_signature(target)
    assert read is not None
    assert set(read.parameters) == set(inspect.signature(obj).parameters)
    for param, hint in imported.items():
        if param not in ("return", "backbone"):
            assert read.hints.get(param) == hint, param


@pytest.mark.parametrize("backbone", sorted(p.stem for p in (CONF / "backbone").glob("*.yaml")))
def test_stage_channels_equal_timms(backbone):
    import timm

    from tiled_hydra.models.stages import STAGE_CHANNELS

    timm_name = yaml.safe_load((CONF / "backbone" / f"{backbone}.yaml").read_text())["timm_name"]
    net = timm.create_model(timm_name, features_only=True, pretrained=False)
    assert STAGE_CHANNELS[timm_name] == tuple(net.feature_info.channels())
    # config.check_whole_image takes stage i's reduction to be 2 ** (i + 1)
    assert net.feature_info.reduction() == [2 ** (i + 1) for i in range(len(STAGE_CHANNELS[timm_name]))]


def test_trainer_lists_equal_lightnings():
    import inspect

    import lightning
    from lightning.fabric.connector import _PRECISION_INPUT_STR

    assert set(TRAINER_ARGUMENTS) == set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    assert set(PRECISIONS) == set(typing.get_args(_PRECISION_INPUT_STR))


def test_choices_listed_for_the_check_equal_the_codes():
    from tiled_hydra.config import INFERENCE_FEATURES, INFERENCE_MODES, MERGE_CALIBRATIONS, MERGE_WINDOWS, REPORT_MAPS
    from tiled_hydra.core.calibration import CALIBRATIONS, WINDOWS
    from tiled_hydra.core.features import FEATURES
    from tiled_hydra.inference.engine import MODES
    from tiled_hydra.reporting.maps import MAP_FORMATS

    assert INFERENCE_MODES == tuple(MODES) and INFERENCE_FEATURES == tuple(FEATURES)
    assert MERGE_CALIBRATIONS == tuple(CALIBRATIONS) and MERGE_WINDOWS == tuple(WINDOWS)
    assert REPORT_MAPS == tuple(MAP_FORMATS)


# -- the process boundary: the one test that starts a process ---------------------------------------------------------
SCRIPT = """
import sys
from hydra import compose, initialize_config_dir
from tiled_hydra.config import CONF_DIR, validate
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    for model in {models!r}:  # every model's defaults validate without torch
        validate(compose("config", overrides=["+setup=ens9", "model=" + model]))
from hydra.core.global_hydra import GlobalHydra
GlobalHydra.instance().clear()
from tiled_hydra.cli.train import cli
try:
    cli({args!r})
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def test_a_config_error_exits_2_without_importing_torch(tmp_path):
    args = ["+setup=ens9", "logger=none", "model.net.n_features=-5", f"hydra.run.dir={tmp_path / 'run'}"]
    script = SCRIPT.format(models=sorted(PER_MODEL), args=args)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["tiled_hydra: error: model.net.n_features=-5: expected an integer in [1, 176] "
                                        "(176: the channels of efficientnet_lite0 at layers [1, 2, 3])"]
    assert "torch imported: False" in proc.stdout
