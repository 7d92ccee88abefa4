"""Overlay pictures (reporting/overlays.py): which images are shown and under which name, what the
header says, how the map is painted, and the layout at the image's own aspect ratio. No training:
the functions that decide the names and the text are tested on hand-made scores and thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiled_hydra.core.postprocess import Postprocessor
from tiled_hydra.data.images import Sample, read_split
from tiled_hydra.reporting.overlays import (
    Verdict, choose_overlays, compared, crop_box, draw_overlay, explain, native_view, paint, short_path, verdict_of,
    worst_spot,
)

# Raw maps on [0, 100], pixel threshold 60 -> normalised (x - 60) / 100 + 0.5; image threshold 50.
POST = Postprocessor(image_threshold=50.0, pixel_threshold=60.0, score_min=0.0, score_max=100.0, map_min=0.0, map_max=100.0)


def tags(scores, labels, thresholds, count):
    picks = choose_overlays(torch.tensor(scores), torch.tensor(labels), torch.tensor(thresholds), count)
    return {p.index: p.tag for p in picks}


def test_a_defective_image_above_its_threshold_is_never_called_below_it():
    # every defective image (0-3) scores at or above 50: the lowest-scored one is named as such, not "below"
    picked = tags([90.0, 70.0, 55.0, 50.0, 20.0, 10.0], [1, 1, 1, 1, 0, 0], [50.0] * 6, 4)
    assert picked == {0: "highest_scored_defective", 1: "highest_scored_defective", 3: "lowest_scored_defective",
                      4: "highest_scored_normal"}


def test_a_defective_image_below_its_threshold_and_a_normal_one_above_are_named_so():
    picked = tags([90.0, 70.0, 49.9, 52.0, 10.0], [1, 1, 1, 0, 0], [50.0] * 5, 4)
    assert picked[2] == "defective_below_image_threshold"  # 49.9 < 50: missed
    assert picked[3] == "normal_above_image_threshold"  # 52 >= 50: a false alarm


def test_names_follow_each_images_own_threshold():
    # cross-fitted runs: each fold has its own image threshold. Image 2 (40) is the lowest-scored
    # defective image; whether it was missed depends on its own threshold only.
    scores, labels = [90.0, 45.0, 40.0, 35.0], [1, 1, 1, 0]
    assert tags(scores, labels, [48.0, 48.0, 30.0, 30.0], 4) == {
        0: "highest_scored_defective", 1: "highest_scored_defective", 2: "lowest_scored_defective",
        3: "normal_above_image_threshold"}
    assert tags(scores, labels, [48.0, 48.0, 42.0, 30.0], 4)[2] == "defective_below_image_threshold"


def test_an_image_picked_twice_is_shown_once_under_its_first_name():
    # 8 overlays ask for 4 highest- and 2 lowest-scored defective images of only 3: each is shown once
    picks = choose_overlays(torch.tensor([90.0, 45.0, 40.0, 35.0]), torch.tensor([1, 1, 1, 0]), torch.tensor([48.0] * 4), 8)
    assert [(p.index, p.tag, p.rank) for p in picks] == [
        (0, "highest_scored_defective", 1), (1, "highest_scored_defective", 2), (2, "highest_scored_defective", 3),
        (3, "highest_scored_normal", 1)]
    assert picks[2].reason == "the 3rd highest-scored of 3 defective test images"


def test_each_kind_is_shown_once_even_with_one_overlay_per_kind():
    picks = choose_overlays(torch.tensor([80.0, 60.0, 10.0]), torch.tensor([1, 1, 0]), torch.tensor([70.0] * 3), 1)
    assert [(p.index, p.tag) for p in picks] == [(0, "highest_scored_defective")]  # count caps the list
    picks = choose_overlays(torch.tensor([80.0, 60.0, 10.0]), torch.tensor([1, 1, 0]), torch.tensor([70.0] * 3), 3)
    assert [(p.index, p.tag) for p in picks] == [(0, "highest_scored_defective"), (1, "defective_below_image_threshold"),
                                                 (2, "highest_scored_normal")]
    assert "below the image threshold: missed" in picks[1].reason and picks[0].reason.startswith("the highest-scored of 2")


def verdict(score, area, peak, label=None, kind=None):
    return Verdict(score=score, image_threshold=50.0, pixel_threshold=60.0, area_px=area, image_px=10_000, peak=peak,
                   label=label, defect_type=kind)


def test_flagged_without_any_pixel_above_the_pixel_threshold_says_so_and_marks_the_peak():
    text = explain(verdict(55.0, 0, 0.4999, label=1, kind="scratch"))
    assert text.mark_peak and text.alarm
    assert text.headline == "defective image (scratch), image score 55 ≥ image threshold 50: labelled anomalous (detected)"
    assert text.region.startswith("labelled anomalous by its image score alone; no pixel above the pixel threshold 60")
    assert "peak 0.49 < 0.5" in text.region  # rounded down: 0.4999 never reads "0.50 < 0.5"


def test_the_header_states_score_threshold_label_and_ground_truth():
    missed = explain(verdict(44.56, 0, 0.3, label=1, kind="crack"))
    assert missed.headline == "defective image (crack), image score 44.56 < image threshold 50: labelled normal (missed)"
    assert not missed.mark_peak and not missed.alarm and "nothing outlined" in missed.region
    alarm = explain(verdict(70.0, 120, 0.8, label=0))
    assert alarm.headline == "normal image, image score 70 ≥ image threshold 50: labelled anomalous (false alarm)"
    assert alarm.region.startswith("white outline: 120 px (1.2 % of the image) at or above the pixel threshold 60")
    # pixels above the pixel threshold in an image that is not flagged: the label is the image score's
    quiet = explain(verdict(30.0, 15, 0.6))
    assert quiet.headline == "labelled normal: image score 30 < image threshold 50"
    assert quiet.region.endswith("yet the image is labelled normal: the label comes from the image score alone")
    assert explain(verdict(50.0, 15, 0.6)).headline == "labelled anomalous: image score 50 ≥ image threshold 50"  # >=


def test_scores_show_enough_digits_to_differ_from_the_threshold():
    assert compared(472.81, 472.83) == ("472.81", "472.83")  # 4 digits would read "472.8 < 472.8"
    assert compared(445.6, 472.8) == ("445.6", "472.8")


def test_only_values_at_or_above_the_pixel_threshold_are_painted_warm():
    grey = np.full((1, 7, 3), 128, dtype=np.uint8)
    values = np.array([[0.0, 0.25, 0.36, 0.499, 0.5, 0.75, 1.0]])
    painted = paint(grey, values).astype(int)
    red, blue = painted[0, :, 0], painted[0, :, 2]
    assert (painted[0, 0] == 128).all()  # 0: the image untouched
    assert (blue[1:4] > red[1:4]).all() and (red[4:] > blue[4:]).all()
    assert blue[1] < blue[2] < blue[3]  # the cool tint grows towards the threshold


def test_worst_spot_is_the_missed_region_then_the_largest():
    mask = np.zeros((50, 50), dtype=bool)
    mask[5:10, 5:10] = True  # detected
    mask[30:33, 40:43] = True  # missed: centre (31, 41)
    prediction = np.zeros_like(mask)
    prediction[5:10, 5:10] = True
    assert worst_spot(np.zeros((50, 50)), mask, prediction) == (31, 41)
    assert worst_spot(np.zeros((50, 50)), mask, mask) == (7, 7)  # all found: the largest region
    heat = np.zeros((50, 50))
    heat[12, 34] = 1.0
    assert worst_spot(heat, np.zeros_like(mask), None) == (12, 34)  # nothing to find: the map's peak


def test_crop_box_stays_inside_the_image():
    rows, cols = crop_box((2, 98), (60, 100), 40)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 40, 60, 100)
    rows, cols = crop_box((5, 5), (20, 30), 96)  # image smaller than the crop: the whole image
    assert (rows.stop - rows.start, cols.stop - cols.start) == (20, 30)


def test_short_path_keeps_the_tail():
    assert short_path("a/b.png") == "a/b.png"
    shown = short_path("/" + "x" * 80 + "/brick/test/stain/000.png", limit=40)
    assert shown == ".../brick/test/stain/000.png"


@pytest.mark.parametrize("flagged", [True, False])
def test_verdict_from_a_raw_map_counts_pixels_at_the_threshold(flagged):
    raw = torch.full((4, 5), 10.0)
    raw[1, 2] = 60.0  # exactly the pixel threshold: anomalous (>=), normalised 0.5
    v, heat, prediction = verdict_of(55.0 if flagged else 45.0, POST, raw, label=1, defect_type="spot")
    assert v.area_px == 1 and prediction[1, 2] and v.image_px == 20
    assert heat[1, 2] == 0.5 and v.peak == 0.5 and v.flagged is flagged


def test_overlay_keeps_the_aspect_ratio(tmp_path):
    sizes = {}
    for name, (h, w) in {"landscape": (300, 600), "portrait": (600, 300)}.items():
        image = np.full((h, w), 120, dtype=np.uint8)
        image[100:104, 100:104] = 250
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[100:104, 100:104] = 255
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
        split = read_split([Sample(tmp_path / f"{name}.png", 1, "spot", tmp_path / f"{name}_mask.png")], (64, 64), "t", True)
        native, truth = native_view(split, 0)
        assert native.shape[:2] == (h, w) and truth.shape == (h, w)  # from the files, not the 64x64 copies
        raw = torch.zeros(h, w)
        raw[100:104, 100:104] = 90.0
        v, heat, prediction = verdict_of(70.0, POST, raw, 1, "spot")
        out = draw_overlay(tmp_path / f"overlay_{name}.png", native, heat, prediction, explain(v), name, truth)
        with Image.open(out) as figure:
            sizes[name] = figure.size
    # two 2:1 views + a square crop vs two 1:2 views + a square crop: the landscape figure is wider and lower
    (lw, lh), (pw, ph) = sizes["landscape"], sizes["portrait"]
    assert lw > pw and lh < ph
