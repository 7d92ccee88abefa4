"""Dataset loaders on tiny trees in the real layouts, the synthetic generator, and every bad input."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_method
from omegaconf import OmegaConf
from PIL import Image

from tiled_hydra.data import synthetic, views
from tiled_hydra.data.elpv import load_elpv
from tiled_hydra.data.folder import load_folder
from tiled_hydra.data.images import image_size_hw, read_image
from tiled_hydra.data.mvtec import load_mvtec
from tiled_hydra.data.synthetic import SyntheticSpec, load_synthetic
from tiled_hydra.data.visa import load_visa
from tiled_hydra.errors import ConfigError, DataError, instantiate_checked

CONF_DATASET = Path(__file__).resolve().parent.parent / "conf" / "dataset"
RNG = np.random.default_rng(0)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def gray(h: int = 48, w: int = 48) -> np.ndarray:
    return RNG.integers(60, 200, (h, w))


def color(h: int = 48, w: int = 48) -> np.ndarray:
    return RNG.integers(60, 200, (h, w, 3))


def square_mask(h: int = 48, w: int = 48, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w))
    mask[8:20, 10:22] = value
    return mask


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- MVTec AD -------------------------------------------------------------------------------------
def write_mvtec(root: Path, category: str = "widget") -> Path:
    cat = root / category
    for i in range(3):
        save(cat / f"train/good/{i:03d}.png", gray())  # grayscale, as in several MVTec categories
    save(cat / "test/good/000.png", gray())
    for i in range(2):
        save(cat / f"test/scratch/{i:03d}.png", gray())
        save(cat / f"ground_truth/scratch/{i:03d}_mask.png", square_mask())
    return root


def test_mvtec_loads_the_real_layout(tmp_path):
    data = load_mvtec(root=str(write_mvtec(tmp_path)), category="widget", image_size=[32, 40], name="mvtec")
    assert data.val is None
    assert data.train.images.shape == (3, 3, 32, 40) and data.train.images.dtype == torch.uint8
    assert data.train.labels.tolist() == [0, 0, 0]
    test = data.test
    assert test.images.shape == (3, 3, 32, 40) and test.masks.shape == (3, 32, 40) and test.masks.dtype == torch.bool
    assert test.labels.tolist() == [0, 1, 1]
    assert test.defect_types == ["good", "scratch", "scratch"]
    assert not test.masks[0].any() and test.masks[1:].any(dim=(1, 2)).all()
    # The 12x12 square of a 48 px mask is 8x10 after resizing to 32x40 (nearest keeps it binary and in place).
    assert test.masks[1].sum() == 8 * 10
    assert test.paths[1].endswith("test/scratch/000.png")


def test_grayscale_images_load_as_three_equal_channels(tmp_path):
    data = load_mvtec(root=str(write_mvtec(tmp_path)), category="widget", image_size=48)
    image = data.train.images[0]
    assert image.shape == (3, 48, 48)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    original = np.asarray(Image.open(tmp_path / "widget/train/good/000.png"))
    assert np.array_equal(image[0].numpy(), original)  # same size: no resampling


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8), 257 * 100, np.uint16)).save(tmp_path / "mid.png")
    assert read_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    assert read_image(tmp_path / "mid.png").getpixel((0, 0)) == (100, 100, 100)


@pytest.mark.parametrize(
    "break_tree, root, category, error, expected",
    [
        (None, None, "widget", ConfigError, "set dataset.root=DIR"),
        (None, "missing", "widget", DataError, "missing does not exist"),
        (None, ".", "nope", DataError, "no category 'nope'"),
        (lambda c: (c / "train/good/001.png").write_bytes(b"not a png"), ".", "widget", DataError, "001.png"),
        (lambda c: (c / "ground_truth/scratch/001_mask.png").unlink(), ".", "widget", DataError, "no mask for anomalous image"),
        (lambda c: save(c / "ground_truth/scratch/001_mask.png", square_mask(20, 20)), ".", "widget", DataError, "mask size"),
        (lambda c: [p.unlink() for p in (c / "train/good").iterdir()], ".", "widget", DataError, "no images in"),
    ],
    ids=["root-unset", "missing-root", "missing-category", "corrupt-image", "no-mask", "mask-size", "empty-train"],
)
def test_mvtec_bad_input_is_a_one_line_error(tmp_path, break_tree, root, category, error, expected):
    write_mvtec(tmp_path)
    if break_tree:
        break_tree(tmp_path / "widget")
    with pytest.raises(error) as err:
        load_mvtec(root=None if root is None else str(tmp_path / root), category=category, image_size=32)
    message = one_line(err)
    assert expected in message
    if category == "nope":
        assert "widget" in message  # lists the categories it found
    if expected == "mask size":
        assert "001_mask.png" in message and "scratch/001.png" in message  # names both files
    if expected == "no images in":
        assert "train/good" in message


# -- VisA -----------------------------------------------------------------------------------------
def write_visa(root: Path, header: str = "object,split,label,image,mask") -> Path:
    rows = [header]
    for category in ("candle", "pcb1"):
        images = root / category / "Data" / "Images"
        for i in range(3):
            save(images / f"Normal/{i:04d}.JPG", color(40, 56))
            rows.append(f"{category},train,normal,{category}/Data/Images/Normal/{i:04d}.JPG,")
        save(images / "Normal/0100.JPG", color(40, 56))
        rows.append(f"{category},test,normal,{category}/Data/Images/Normal/0100.JPG,")
        for i in range(2):
            save(images / f"Anomaly/{i:03d}.JPG", color(40, 56))
            save(root / category / f"Data/Masks/Anomaly/{i:03d}.png", square_mask(40, 56, value=1))  # VisA masks are not 0/255
            rows.append(f"{category},test,anomaly,{category}/Data/Images/Anomaly/{i:03d}.JPG,{category}/Data/Masks/Anomaly/{i:03d}.png")
    save_csv = root / "split_csv" / "1cls.csv"
    save_csv.parent.mkdir(parents=True, exist_ok=True)
    save_csv.write_text("\n".join(rows) + "\n")
    return root


def test_visa_loads_the_real_layout(tmp_path):
    data = load_visa(root=str(write_visa(tmp_path)), category="pcb1", image_size=[32, 48], name="visa")
    assert data.val is None and data.train.masks is None
    assert data.train.images.shape == (3, 3, 32, 48) and data.train.labels.tolist() == [0, 0, 0]
    assert all("pcb1" in p for p in data.train.paths + data.test.paths)
    assert data.test.labels.tolist() == [0, 1, 1]
    assert not data.test.masks[0].any() and data.test.masks[1:].any(dim=(1, 2)).all()


def edit_csv(root: Path, old: str, new: str) -> None:
    path = root / "split_csv/1cls.csv"
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize(
    "break_tree, category, expected",
    [
        (lambda r: (r / "split_csv/1cls.csv").unlink(), "candle", "1cls.csv does not exist"),
        (lambda r: edit_csv(r, "object,split,label,image,mask", "object,split,label,image"), "candle", "lacks the column(s) mask"),
        (lambda r: edit_csv(r, "candle,test,normal", "candle,test,good"), "candle", "label must be normal or anomaly"),
        (lambda r: edit_csv(r, "candle,test,normal", "candle,valid,normal"), "candle", "split must be train or test"),
        (lambda r: edit_csv(r, "candle/Data/Masks/Anomaly/000.png", ""), "candle", "no mask for anomalous image"),
        (None, "cashew", "no category 'cashew'"),
        (lambda r: __import__("shutil").rmtree(r / "candle"), "candle", "candle does not exist"),
        (lambda r: (r / "candle/Data/Images/Normal/0001.JPG").unlink(), "candle", "image file missing"),
    ],
    ids=["no-csv", "missing-column", "bad-label", "bad-split", "no-mask", "unknown-category", "no-folder", "no-image"],
)
def test_visa_bad_input_is_a_one_line_error(tmp_path, break_tree, category, expected):
    write_visa(tmp_path)
    if break_tree:
        break_tree(tmp_path)
    with pytest.raises(DataError) as err:
        load_visa(root=str(tmp_path), category=category, image_size=32)
    assert expected in one_line(err)


# -- a user's own folders -------------------------------------------------------------------------
def write_folder(root: Path) -> Path:
    for i in range(10):
        save(root / f"good/n{i}.png", color(30 + i, 50))  # any size and aspect
    save(root / "bad/a0.jpg", color(40, 60))
    save(root / "bad/a1.png", gray(24, 24))
    rgba = np.zeros((40, 60, 4))
    rgba[..., 0], rgba[..., 3] = square_mask(40, 60), 255  # red on opaque alpha: the alpha is not an anomaly
    save(root / "masks/a0_mask.png", rgba)  # NAME_mask.*
    save(root / "masks/a1.png", square_mask(24, 24))  # NAME.*
    return root


def test_folder_holds_out_a_seeded_share_of_normals(tmp_path):
    root = write_folder(tmp_path)
    data = load_folder(root=str(root), normal_dir="good", abnormal_dir="bad", image_size=32, mask_dir="masks", seed=3)
    assert len(data.train) == 8 and data.val is None
    assert data.test.labels.tolist() == [0, 0, 1, 1]
    assert data.test.images.shape == (4, 3, 32, 32)
    assert data.test.masks[2:].any(dim=(1, 2)).all() and not data.test.masks[:2].any()
    assert data.test.masks[2].float().mean() < 0.1
    assert not set(data.train.paths) & set(data.test.paths)
    again = load_folder(root=str(root), normal_dir="good", abnormal_dir="bad", image_size=32, mask_dir="masks", seed=3)
    assert again.test.paths == data.test.paths
    other = load_folder(root=str(root), normal_dir="good", abnormal_dir="bad", image_size=32, mask_dir="masks", seed=4)
    assert other.test.paths != data.test.paths


def test_folder_with_separate_normal_test_and_val_dirs_and_no_masks(tmp_path):
    root = write_folder(tmp_path)
    save(root / "good_test/t0.png", color())
    save(root / "val_good/v0.png", color())
    save(root / "val_bad/v1.png", color())
    data = load_folder(
        root=str(root), normal_dir="good", abnormal_dir=str(root / "bad"), image_size=[16, 24],
        normal_test_dir="good_test", val_normal_dir="val_good", val_abnormal_dir="val_bad",
    )
    assert len(data.train) == 10 and data.test.labels.tolist() == [0, 1, 1]
    assert data.test.masks is None and data.val.masks is None  # no mask_dir: image labels only
    assert data.val.labels.tolist() == [0, 1] and data.val.images.shape == (2, 3, 16, 24)


def test_folder_bad_input_is_a_one_line_error(tmp_path):
    root = write_folder(tmp_path)
    with pytest.raises(ConfigError, match="set dataset.root=DIR"):
        load_folder(root=None, normal_dir="good", abnormal_dir="bad", image_size=32)
    with pytest.raises(DataError) as err:
        load_folder(root=str(root), normal_dir="nothing_here", abnormal_dir="bad", image_size=32)
    assert "nothing_here does not exist" in one_line(err)
    (root / "masks/a1.png").unlink()
    with pytest.raises(DataError) as err:
        load_folder(root=str(root), normal_dir="good", abnormal_dir="bad", image_size=32, mask_dir="masks")
    assert "no mask for anomalous image" in one_line(err) and "a1.png" in str(err.value)
    with pytest.raises(ConfigError):
        load_folder(root=str(root), normal_dir="good", abnormal_dir="bad", image_size=32, normal_test_split=1.0)


# -- ELPV -----------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="optional extra not installed: pip install elpv-dataset")
def test_elpv_splits_real_cells_by_defect_probability():
    data = load_elpv(image_size=16, category="mono", defect_threshold=0.5, train_fraction=0.8, seed=0, name="elpv")
    assert data.val is None and data.test.masks is None and data.train.masks is None
    # 588 mono cells of probability 0 (80% train), 56 + 313 of probability 2/3 and 1.
    assert len(data.train) == 470 and data.train.labels.sum() == 0
    assert data.test.labels.tolist().count(0) == 118 and data.test.labels.sum() == 369
    assert data.train.images.shape[1:] == (3, 16, 16)
    assert not set(data.train.paths) & set(data.test.paths)


def test_elpv_without_its_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "elpv_dataset" else real_find_spec(n, *a))
    with pytest.raises(ConfigError, match="pip install elpv-dataset"):
        load_elpv(image_size=16)


# -- synthetic ------------------------------------------------------------------------------------
SMALL = dict(resolution=256, n_train=3, n_val=4, n_test=10, test_defective_fraction=0.6)


def test_synthetic_is_deterministic_in_its_bytes(tmp_path):
    spec = SyntheticSpec("grass", 256, 2, 2, 0.5, 4, 0.5, 0.5, seed=1)
    first = synthetic.ensure_generated(spec, tmp_path / "a")
    second = synthetic.ensure_generated(spec, tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 2 + 2 + 4 + 3  # images and the masks of 3 defective images
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other = synthetic.ensure_generated(SyntheticSpec("grass", 256, 2, 2, 0.5, 4, 0.5, 0.5, seed=2), tmp_path / "c")
    assert (first / files[0]).read_bytes() != (other / files[0]).read_bytes()


def test_synthetic_layout_masks_and_small_defects(tmp_path):
    data = load_synthetic(image_size=256, root=str(tmp_path), category="brick", **SMALL)
    folder = tmp_path / "brick"
    assert (folder / "train/good").is_dir() and (folder / "ground_truth_val").is_dir()
    assert len(data.train) == 3 and data.val.labels.tolist() == [0, 0, 1, 1]
    assert data.test.labels.sum() == 6 and len(data.test) == 10
    for split in (data.val, data.test):
        areas = split.masks.float().mean(dim=(1, 2))
        assert (areas[split.labels == 1] > 0).all() and (areas[split.labels == 0] == 0).all()
        assert set(split.defect_types) <= {"good", *synthetic.DEFECT_KINDS}
    areas = data.test.masks.float().mean(dim=(1, 2))[data.test.labels == 1]
    assert (areas < synthetic.SMALL_AREA).float().mean() >= 0.4


@pytest.mark.parametrize("kind", synthetic.DEFECT_KINDS)
@pytest.mark.parametrize("small", [True, False])
def test_synthetic_defects_are_visible_and_of_their_size_class(kind, small):
    rng = np.random.default_rng(7)
    image = views.normal_view(views.periodic_texture("gravel"), 512, rng)
    out, mask = synthetic.add_defect(image, kind, small, rng)
    assert (mask.mean() < synthetic.SMALL_AREA) == small
    assert np.abs(out - image)[mask].mean() >= synthetic.MIN_CONTRAST
    assert np.array_equal(out[~mask], image[~mask])  # the mask is exact: nothing changes outside it


@pytest.mark.parametrize("category", ["gravel", "coffee"])
@pytest.mark.parametrize("kind", synthetic.DEFECT_KINDS)
@pytest.mark.parametrize("small", [True, False])
def test_hard_preset_defects_are_faint_small_and_exact(category, kind, small):
    preset = synthetic.PRESETS["hard"]
    rng = np.random.default_rng(3)
    if category in synthetic.OBJECTS:
        image = views.object_view(views.object_photo(category, 512), 512, rng, misalign=True)
    else:
        image = views.normal_view(views.periodic_texture(category), 512, rng)
    out, mask = synthetic.add_defect(image, kind, small, rng, preset)
    assert (mask.mean() < preset.small_area) == small  # small: < 0.1% of the image (default preset: 1%)
    change = np.abs(out - image)[mask].mean()
    assert change >= preset.min_contrast
    if kind != "missing":  # faint: at most 16% of the gray range (plus the stretch of a blur-free additive change)
        assert change <= 255 * preset.contrast[1] + 1e-6
    assert np.array_equal(out[~mask], image[~mask])


def test_hard_preset_objects_move_and_images_carry_nuisance(tmp_path):
    data = load_synthetic(image_size=256, root=str(tmp_path), category="coffee", preset="hard", resolution=256,
                          n_train=3, n_val=0, n_test=2, test_defective_fraction=0.5, small_defect_share=1.0)
    train = data.train.images.float()
    assert not torch.equal(train[0, 0], train[0, 1])  # colour photo, not gray
    # aligned objects, but not pixel-aligned: consecutive normal views differ by more than noise
    assert (train[0] - train[1]).abs().mean() > 4.0
    params = json.loads((tmp_path / "coffee" / "params.json").read_text())
    assert params["preset"] == "hard" and params["resolution"] == 256
    areas = data.test.masks.float().mean(dim=(1, 2))[data.test.labels == 1]
    assert (areas > 0).all() and (areas < synthetic.PRESETS["hard"].small_area).all()


def test_preset_sets_the_resolution_unless_given(tmp_path):
    load_synthetic(image_size=32, root=str(tmp_path), category="grass", preset="hard", n_train=1, n_val=0, n_test=1,
                   test_defective_fraction=0.0)
    assert json.loads((tmp_path / "grass" / "params.json").read_text())["resolution"] == 1024
    with pytest.raises(ConfigError, match="default, hard"):
        load_synthetic(image_size=32, root=str(tmp_path), preset="extreme")


def test_synthetic_cache_is_reused_and_interruption_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    params = dict(category="gravel", resolution=128, n_train=2, n_val=0, val_defective_fraction=0.5, n_test=2,
                  test_defective_fraction=0.5, small_defect_share=0.5, seed=0)
    spec = SyntheticSpec(**params)

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "write_split", interrupted)
        with pytest.raises(KeyboardInterrupt):
            synthetic.ensure_generated(spec, None)
    cache = tmp_path / "tiled_hydra" / "synthetic" / spec.digest()
    assert list(cache.iterdir()) == []  # no half dataset, no temporary folder

    folder = synthetic.ensure_generated(spec, None)
    assert folder == cache / "gravel" and (folder / "params.json").is_file()
    monkeypatch.setattr(synthetic, "generate", lambda *a: pytest.fail("regenerated an existing dataset"))
    data = load_synthetic(image_size=64, root=None, **params)
    assert data.val is None and len(data.train) == 2


def test_synthetic_bad_parameters(tmp_path):
    with pytest.raises(ConfigError, match="brick, grass, gravel"):
        load_synthetic(image_size=64, category="marble", root=str(tmp_path))
    load_synthetic(image_size=64, root=str(tmp_path), resolution=128, n_train=1, n_val=0, n_test=1)
    with pytest.raises(DataError) as err:  # same folder, other parameters: refuse to mix them
        load_synthetic(image_size=64, root=str(tmp_path), resolution=128, n_train=2, n_val=0, n_test=1)
    assert "n_train" in one_line(err)


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(p.stem for p in CONF_DATASET.glob("*.yaml")))
def test_dataset_config_matches_its_loader(config):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DATASET / f"{config}.yaml"))
    loader = get_method(cfg.pop("_target_"))
    params = inspect.signature(loader).parameters
    assert cfg["name"] == config and "category" in cfg
    assert set(cfg) | {"image_size"} == set(params)  # every parameter visible, no unknown key
    for key, value in cfg.items():
        if params[key].default is not inspect.Parameter.empty:
            assert params[key].default == value, f"{config}.yaml {key} differs from the code's default"


@pytest.mark.parametrize("config", ["mvtec", "visa", "folder"])
def test_unset_root_asks_for_it_through_instantiate(config):
    with pytest.raises(ConfigError, match=r"set dataset\.root=DIR"):
        instantiate_checked(OmegaConf.load(CONF_DATASET / f"{config}.yaml"), image_size=[32, 32])


def test_image_size_forms():
    assert image_size_hw(64) == (64, 64) and image_size_hw([32, 48]) == (32, 48)
    assert image_size_hw(OmegaConf.create([32, 48])) == (32, 48)
    with pytest.raises(ConfigError):
        image_size_hw([32])
