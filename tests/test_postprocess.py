"""Thresholds, normalisation and cross-fitting: fitted on other images, never the scored one."""

import pytest
import torch

from tiled_hydra.core.postprocess import Postprocessor, cross_fit, f1_optimal_threshold, fit_postprocessor, stratified_folds


def test_f1_optimal_threshold_by_hand():
    # Predict score >= t. Positives: 0.3, 0.5, 0.6 (3). F1 = 2TP / (predicted + 3):
    #   t=0.6: TP 1, 1 predicted -> 2/4 = 0.50    t=0.3: TP 3, 4 predicted -> 6/7 = 0.857  <- best
    #   t=0.5: TP 2, 2 predicted -> 4/5 = 0.80    t=0.2: TP 3, 5 predicted -> 6/8 = 0.75
    #   t=0.4: TP 2, 3 predicted -> 4/6 = 0.67    t=0.1: TP 3, 6 predicted -> 6/9 = 0.67
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    assert f1_optimal_threshold(scores, labels) == pytest.approx(0.3)


def test_f1_optimal_threshold_counts_ties_together():
    # t=0.9: TP 1, 1 predicted -> 2/3;  t=0.5 (two tied scores, one positive): TP 2, 3 predicted
    # -> 4/5 <- best;  t=0.2: TP 2, 4 predicted -> 4/6.
    assert f1_optimal_threshold(torch.tensor([0.2, 0.5, 0.5, 0.9]), torch.tensor([0, 1, 0, 1])) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_f1_optimal_threshold_equals_a_brute_force_search(seed):
    # Every distinct score tried as the threshold, in float64; ties in F1 resolve to the highest
    # threshold. Few distinct values: many ties between scores, and between F1 values.
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 12, (200,), generator=g).float() / 4
    labels = torch.rand(200, generator=g) < torch.sigmoid(scores - 1.5)
    best_f1, best_t = -1.0, None
    for t in sorted(set(scores.tolist())):
        predicted = scores >= t
        f1 = 2 * float((predicted & labels).sum()) / (float(predicted.sum()) + float(labels.sum()))
        if f1 >= best_f1 - 1e-12:
            best_f1, best_t = max(best_f1, f1), t
    assert f1_optimal_threshold(scores, labels) == best_t

    with pytest.raises(ValueError, match="NaN or infinite"):
        f1_optimal_threshold(torch.cat([scores, torch.tensor([float("nan")])]), torch.cat([labels, torch.tensor([True])]))


def test_without_positives_the_threshold_flags_nothing():
    scores = torch.tensor([0.2, 0.9, 0.4])
    threshold = f1_optimal_threshold(scores, torch.zeros(3))
    assert threshold > 0.9 and not bool((scores >= threshold).any())


def test_pixel_threshold_from_masks_else_the_image_threshold():
    scores, labels = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])
    maps = torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 0.8]], [[0.1, 0.1], [0.9, 0.9]]])
    masks = maps >= 0.7  # pixels: anomalous exactly from 0.7 up -> F1 = 1 there
    post = fit_postprocessor(scores, labels, maps, masks)
    assert post.image_threshold == 2.0 and post.pixel_threshold == pytest.approx(0.7)
    assert (post.score_min, post.score_max) == (1.0, 3.0)
    assert (post.map_min, post.map_max) == (pytest.approx(0.1), pytest.approx(0.9))
    without_masks = fit_postprocessor(scores, labels, maps)
    assert without_masks.pixel_threshold == without_masks.image_threshold == 2.0
    with pytest.raises(ValueError, match="without maps"):
        fit_postprocessor(scores, labels).normalize_maps(maps)


def test_normalization_puts_the_threshold_at_one_half_and_clips():
    post = Postprocessor(
        image_threshold=3.0, pixel_threshold=0.5, score_min=1.0, score_max=5.0, map_min=0.0, map_max=2.0
    )
    # (x - 3) / (5 - 1) + 0.5
    assert post.normalize_scores(torch.tensor([3.0, 4.0, 1.0, 9.0, -9.0])).tolist() == [0.5, 0.75, 0.0, 1.0, 0.0]
    maps = torch.tensor([[[0.5, 1.0], [0.0, 3.0]]])
    assert post.normalize_maps(maps).tolist() == [[[0.5, 0.75], [0.25, 1.0]]]
    labels, masks = post.predict(torch.tensor([2.9, 3.0]), maps)
    assert labels.tolist() == [False, True] and masks.tolist() == [[[True, True], [False, True]]]
    assert post.predict(torch.tensor([3.0]))[1] is None


def make_test_set(seed: int = 0, n: int = 10, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1] * (n // 2))
    scores = torch.rand(n, generator=g) + 0.6 * labels  # informative but overlapping
    maps = torch.rand(n, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[labels == 1, 2:5, 2:5] = True
    maps = maps + 0.5 * masks  # map values higher in the defects
    return scores, labels, maps, masks


def test_folds_are_stratified_and_seeded():
    labels = torch.tensor([0] * 7 + [1] * 4)
    folds = stratified_folds(labels, seed=3)
    for label in (0, 1):
        counts = torch.bincount(folds[labels == label], minlength=2)
        assert abs(int(counts[0]) - int(counts[1])) <= 1
    assert abs(int((folds == 0).sum()) - int((folds == 1).sum())) <= 1
    assert torch.equal(folds, stratified_folds(labels, seed=3))
    assert any(not torch.equal(folds, stratified_folds(labels, seed=s)) for s in range(4, 10))


def test_each_fold_uses_parameters_fitted_on_the_other_fold():
    scores, labels, maps, masks = make_test_set()
    pred_labels, pred_masks, norm_scores, norm_maps = cross_fit(scores, labels, maps, masks, seed=0)
    folds = stratified_folds(labels, seed=0)
    for fold in (0, 1):
        held, other = folds == fold, folds != fold
        post = fit_postprocessor(scores[other], labels[other], maps[other], masks[other])
        expected_labels, expected_masks = post.predict(scores[held], maps[held])
        assert torch.equal(pred_labels[held], expected_labels) and torch.equal(pred_masks[held], expected_masks)
        assert torch.equal(norm_scores[held], post.normalize_scores(scores[held]))
        assert torch.equal(norm_maps[held], post.normalize_maps(maps[held]))
    assert pred_masks.dtype == torch.bool and norm_maps.shape == maps.shape


def test_an_images_own_label_and_mask_never_change_its_own_prediction():
    scores, labels, maps, masks = make_test_set()
    folds = stratified_folds(labels, seed=0)  # held fixed: only the one image's ground truth changes
    reference = cross_fit(scores, labels, maps, masks, seed=0, folds=folds)
    for image in range(len(labels)):
        flipped_labels, flipped_masks = labels.clone(), masks.clone()
        flipped_labels[image] = 1 - flipped_labels[image]
        flipped_masks[image] = ~flipped_masks[image]
        changed = cross_fit(scores, flipped_labels, maps, flipped_masks, seed=0, folds=folds)
        for before, after in zip(reference, changed):
            assert torch.equal(before[image], after[image])

    # The check has teeth: fitted on all images (its own included), image 0's flipped
    # ground truth does move the thresholds.
    flipped_labels, flipped_masks = labels.clone(), masks.clone()
    flipped_labels[0], flipped_masks[0] = 1, True
    fitted_on_all = fit_postprocessor(scores, labels, maps, masks)
    assert fitted_on_all != fit_postprocessor(scores, flipped_labels, maps, flipped_masks)


def test_cross_fit_default_split_and_no_maps():
    scores, labels, maps, masks = make_test_set(seed=1)
    by_seed = cross_fit(scores, labels, maps, masks, seed=5)
    explicit = cross_fit(scores, labels, maps, masks, seed=5, folds=stratified_folds(labels, 5))
    assert all(torch.equal(a, b) for a, b in zip(by_seed, explicit))
    pred_labels, pred_masks, norm_scores, norm_maps = cross_fit(scores, labels, None, None, seed=5)
    assert pred_masks is None and norm_maps is None
    assert torch.equal(pred_labels, by_seed[0]) and bool(((norm_scores >= 0) & (norm_scores <= 1)).all())
    with pytest.raises(ValueError, match="at least 2"):
        cross_fit(scores[:1], labels[:1], None, None, seed=0)
