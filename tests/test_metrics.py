"""AUPRO pinned against a hand computation, its properties, and compute_metrics on hand cases."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from tiled_hydra.metrics.curves import aupro, compute_metrics

# One 4x4 image. A = anomalous pixel of region A, B = of region B, the rest are normal.
#   0.9A 0.6A 0.7  0.0
#   0.3A 0.5  0.1  0.0
#   0.2  0.1  0.8B 0.3
#   0.1  0.0  0.2  0.2B
# Region A = {(0,0), (0,1), (1,0)} (3 px). Region B = {(2,2), (3,3)}: diagonal neighbours,
# so ONE region of 2 px with 8-connectivity (two of 1 px with 4-connectivity).
# 11 normal pixels: 0.7, 0.5, 0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0.
#
# Thresholds (predict >= t), FPR = normals >= t / 11, PRO = mean(A fraction, B fraction):
#   t=0.9: FPR 0     PRO (1/3 + 0)/2   = 1/6
#   t=0.8: FPR 0     PRO (1/3 + 1/2)/2 = 5/12
#   t=0.7: FPR 1/11  PRO 5/12
#   t=0.6: FPR 1/11  PRO (2/3 + 1/2)/2 = 7/12
#   t=0.5: FPR 2/11  PRO 7/12
#   t=0.3: FPR 3/11  PRO (1 + 1/2)/2   = 3/4    (A's last pixel ties with a normal one)
#   t=0.2: FPR 5/11  PRO 1                       (past 0.3)
# PRO at exactly FPR 0.3, interpolated between (3/11, 3/4) and (5/11, 1):
#   3/4 + (1/4) * (0.3 - 3/11) / (2/11) = 3/4 + (1/4) * (3/20) = 63/80
# Trapezoids from FPR 0 to 0.3:
#   [0, 1/11]     5/12 * 1/11                 = 5/132
#   [1/11, 2/11]  7/12 * 1/11                 = 7/132
#   [2/11, 3/11]  (7/12 + 3/4)/2 * 1/11       = 2/33
#   [3/11, 0.3]   (3/4 + 63/80)/2 * 3/110     = 369/17600
#   sum = 5/33 + 369/17600 = 9107/52800;  / 0.3  ->  AUPRO = 9107/15840 = 0.57494 (to 5 places)
HAND_MAP = torch.tensor(
    [[0.9, 0.6, 0.7, 0.0], [0.3, 0.5, 0.1, 0.0], [0.2, 0.1, 0.8, 0.3], [0.1, 0.0, 0.2, 0.2]]
).unsqueeze(0)
HAND_MASK = torch.zeros(1, 4, 4, dtype=torch.bool)
for r, c in [(0, 0), (0, 1), (1, 0), (2, 2), (3, 3)]:
    HAND_MASK[0, r, c] = True
HAND_AUPRO = 9107 / 15840


def test_aupro_matches_the_hand_computation():
    assert aupro(HAND_MAP, HAND_MASK, fpr_limit=0.3) == pytest.approx(HAND_AUPRO, abs=1e-12)
    assert aupro(HAND_MAP.double(), HAND_MASK) == pytest.approx(HAND_AUPRO, abs=1e-12)  # 0.3 is the default


def random_case(seed: int, images: int = 3, size: int = 16, levels: int | None = None):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(images, size, size, generator=g)
    if levels:  # coarse values: many ties
        maps = (maps * levels).floor()
    masks = torch.rand(images, size, size, generator=g) > 0.85
    masks[0, :4, :4] = True  # at least one region
    return maps, masks


def test_perfect_map_scores_one():
    _, masks = random_case(0)
    assert aupro(masks.float(), masks) == pytest.approx(1.0)
    assert aupro(masks.float() * 5 + torch.rand(masks.shape) * 0.1, masks) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 10])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_is_a_fraction(seed, levels, fpr_limit):
    maps, masks = random_case(seed, levels=levels)
    for candidate in (maps, -maps, masks.float() + maps * 0.01):
        assert 0.0 <= aupro(candidate, masks, fpr_limit) <= 1.0


def test_aupro_is_invariant_to_a_monotone_transform():
    maps, masks = random_case(1, levels=20)  # integer values 0..19: the transform cannot merge any
    reference = aupro(maps, masks)
    assert aupro(torch.exp(maps / 3) * 5 - 2, masks) == pytest.approx(reference, abs=1e-12)
    assert aupro(maps**3 + 1000, masks) == pytest.approx(reference, abs=1e-12)


def test_aupro_is_nan_without_anomalous_pixels():
    assert math.isnan(aupro(torch.rand(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool)))


def test_aupro_rejects_a_bad_limit_and_nan_maps():
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(HAND_MAP, HAND_MASK, fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(torch.where(HAND_MASK, HAND_MAP, torch.nan), HAND_MASK)


def test_compute_metrics_hand_values():
    # Scores around 100: a sigmoid (torchmetrics' treatment of values outside [0, 1]) would
    # saturate them all to 1.0 and give AUROC 0.5; the metric must see the raw order.
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8]) + 100
    labels = torch.tensor([0, 0, 1, 1])
    predicted = torch.tensor([False, True, True, True])
    # AUROC: positive/negative pairs ranked right: 100.35 > 100.1, 100.8 > both; 100.35 < 100.4 -> 3/4.
    # F1: TP 2, FP 1, FN 0 -> 2*2 / (2*2 + 1 + 0) = 4/5.
    maps = torch.tensor([[[0.9, 0.5], [0.4, 0.1]]])
    masks = torch.tensor([[[True, False], [True, False]]])
    pred_masks = torch.tensor([[[True, True], [False, False]]])
    # pixel AUROC: anomalous {0.9, 0.4} vs normal {0.5, 0.1}: 3 of 4 pairs right -> 3/4.
    # pixel F1: TP 1, FP 1, FN 1 -> 2 / (2 + 1 + 1) = 1/2.
    # pixel AUPRO: one region (the two anomalous pixels touch): PRO = TPR here; curve
    #   (0,0) -> t=0.9 (0, 1/2) -> t=0.5 (1/2, 1/2): PRO at FPR 0.3 is 1/2 -> area 0.15 / 0.3 = 1/2.
    results = compute_metrics(scores, labels, predicted, maps, masks, pred_masks, fpr_limit=0.3)
    assert results == pytest.approx(
        {"image_AUROC": 0.75, "image_F1": 0.8, "pixel_AUROC": 0.75, "pixel_AUPRO": 0.5, "pixel_F1": 0.5}
    )


def test_compute_metrics_without_masks_has_no_pixel_keys():
    results = compute_metrics(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert results == {"image_AUROC": 1.0, "image_F1": 1.0}


def test_pixel_auroc_is_exact_with_ties_and_aupro_matches():
    maps, masks = random_case(2, levels=7)
    maps = maps / 7  # in [0, 1]: torchmetrics uses the values as they are
    results = compute_metrics(torch.tensor([0.2, 0.7, 0.9]), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]),
                              maps, masks, maps > 0.5, fpr_limit=0.3)
    assert results["pixel_AUROC"] == pytest.approx(float(binary_auroc(maps.flatten(), masks.flatten().long())))
    assert results["pixel_AUPRO"] == aupro(maps, masks, 0.3)
    assert all(0.0 <= value <= 1.0 for value in results.values())


def test_image_auroc_is_nan_with_one_class():
    results = compute_metrics(torch.tensor([0.1, 0.9]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert math.isnan(results["image_AUROC"])
