"""Overlays at the image's own aspect ratio, cropped around the worst spot (overlays.py)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tiled_hydra.data.images import Sample, read_split
from tiled_hydra.reporting.overlays import crop_box, save_overlay, worst_spot


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
    assert worst_spot(heat, np.zeros_like(mask), None) == (12, 34)  # normal image: the worst false alarm


def test_crop_box_stays_inside_the_image():
    rows, cols = crop_box((2, 98), (60, 100), 40)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 40, 60, 100)
    rows, cols = crop_box((5, 5), (20, 30), 96)  # image smaller than the crop: the whole image
    assert (rows.stop - rows.start, cols.stop - cols.start) == (20, 30)


def test_overlay_keeps_the_aspect_ratio(tmp_path):
    widths = {}
    for name, (h, w) in {"landscape": (300, 600), "portrait": (600, 300)}.items():
        image = np.full((h, w), 120, dtype=np.uint8)
        image[100:104, 100:104] = 250
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[100:104, 100:104] = 255
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
        split = read_split([Sample(tmp_path / f"{name}.png", 1, "spot", tmp_path / f"{name}_mask.png")], (64, 64), "t", True)
        out = tmp_path / f"overlay_{name}.png"
        save_overlay(out, split, 0, torch.zeros(64, 64), 0.5, name)
        with Image.open(out) as figure:
            widths[name] = figure.size
    # figure width / height follows the image: two 2:1 views + a square crop vs two 1:2 views + a square crop
    aspect = {name: w / h for name, (w, h) in widths.items()}
    assert aspect["landscape"] > 2 * aspect["portrait"]
