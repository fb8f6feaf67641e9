"""The Chefer et al. segmentation metrics against values computed by hand on tiny maps."""

from __future__ import annotations

import pytest
import torch
from clipdecomp.seg_metrics import (
    SegmentationMeter,
    average_precision,
    binarise,
    foreground_ap,
    normalise,
    segmentation_scores,
)

# Image A: normalised map [[1, 0], [.875, .125]], mean .5 -> predicted foreground [[1, 0], [1, 0]].
MAP_A = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
MASK_A = torch.tensor([[1, 0], [0, 0]])
# Image B: normalised [[0, 0], [0, 1]], mean .25 -> predicted foreground [[0, 0], [0, 1]]: perfect.
MAP_B = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
MASK_B = torch.tensor([[0, 0], [0, 1]])


def test_binarise_is_strictly_above_the_mean_after_min_max():
    assert binarise(MAP_A[None])[0].tolist() == [[True, False], [True, False]]
    on_the_mean = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])  # mean .5: the two .5 pixels stay background
    assert binarise(on_the_mean)[0].tolist() == [[False, True], [False, False]]
    assert not binarise(torch.full((1, 3, 3), 7.0)).any()  # a constant map: all background, no NaN
    torch.testing.assert_close(normalise(MAP_A[None])[0], torch.tensor([[1.0, 0.0], [0.875, 0.125]]))


def test_scores_accumulate_over_the_dataset():
    scores = segmentation_scores(torch.stack([MAP_A, MAP_B]), torch.stack([MASK_A, MASK_B]))
    # pixels: A 3 of 4 right, B 4 of 4.
    assert scores.pixel_accuracy == pytest.approx(7 / 8)
    # background: A inter 2 / union 3, B 3 / 3 -> 5 / 6; foreground: A 1 / 2, B 1 / 1 -> 2 / 3
    # (a mean of per-image IoUs would give 3 / 4 for the foreground).
    assert scores.iou == pytest.approx((5 / 6, 2 / 3))
    assert scores.miou == pytest.approx((5 / 6 + 2 / 3) / 2)
    # AP of A, both classes pooled: at score 1 two positives (P 1, R 2/4), at .875 one of two
    # (P 3/4, R 3/4), at .125 one of two (P 4/6, R 1): .5 + .25 * .75 + .25 * 2 / 3 = 41 / 48. B: 1.
    assert average_precision(MAP_A, MASK_A) == pytest.approx(41 / 48)
    assert scores.mean_ap == pytest.approx((41 / 48 + 1) / 2)
    assert scores.mean_ap_foreground == 1.0  # both maps rank their object's pixels first
    assert scores.n_images == 2
    assert scores.percent() == pytest.approx(
        {"pixel acc": 87.5, "mIoU": 75.0, "mAP": 100 * (41 / 48 + 1) / 2}
    )


def test_foreground_ap_and_the_background_dominated_pooled_ap():
    # scores 1, .875, .125, 0 with the positive second: P = 1/2 at R = 1 -> AP 1/2.
    assert foreground_ap(torch.tensor([[1.0, 0.875], [0.125, 0.0]]), torch.tensor([[0, 1], [0, 0]])) == 0.5
    assert foreground_ap(torch.rand(3, 3), torch.zeros(3, 3)) == 0.0
    # A constant map on a mask with background share b = 3/4: pooled AP = b^2 + (1 - b) / 2.
    mask = torch.tensor([[1, 0], [0, 0]])
    assert average_precision(torch.zeros(2, 2), mask) == pytest.approx(0.75**2 + 0.25 / 2)


def test_meter_batches_equal_one_pass_and_scores_ignore_affine_rescaling():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 8, 8, generator=generator)
    masks = torch.rand(6, 8, 8, generator=generator) > 0.6
    whole = segmentation_scores(maps, masks)
    meter = SegmentationMeter()
    for chunk_maps, chunk_masks in zip(maps.split(4), masks.split(4)):
        meter.update(chunk_maps, chunk_masks)
    assert meter.compute() == whole
    rescaled = segmentation_scores(3 * maps - 2, masks)
    assert rescaled.pixel_accuracy == whole.pixel_accuracy and rescaled.iou == whole.iou
    assert rescaled.mean_ap == pytest.approx(whole.mean_ap)
    flipped = segmentation_scores(-maps, masks)  # an inverted map must score differently
    assert flipped.miou != pytest.approx(whole.miou)


def test_a_perfect_map_scores_one_and_its_inverse_scores_zero_iou():
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 3:, :2] = True
    perfect = segmentation_scores(masks.float(), masks)
    assert (perfect.pixel_accuracy, perfect.miou, perfect.mean_ap) == (1.0, 1.0, 1.0)
    inverse = segmentation_scores(1 - masks.float(), masks)
    assert (inverse.pixel_accuracy, inverse.miou) == (0.0, 0.0)


def test_bad_inputs_are_refused():
    meter = SegmentationMeter()
    with pytest.raises(ValueError, match="No images"):
        meter.compute()
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        meter.update(torch.rand(2, 4, 4), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="binary"):
        meter.update(torch.rand(1, 2, 2), torch.tensor([[[0, 2], [1, 0]]]))
