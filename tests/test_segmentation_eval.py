"""Chapter 7's harness (segmentation_set, compare) against the metrics computed on whole sets at once,
on the toy model and on a tiny ImageNet-segmentation file."""

from __future__ import annotations

import math

import clipdecomp
import matplotlib
import pytest
import torch
from clipdecomp import plots, segmentation, toy
from clipdecomp.seg_metrics import segmentation_scores
from clipdecomp.segmentation_eval import REFERENCE, compare, published_table, segmentation_set
from test_cache import tiny_bundle
from test_imagenet_seg import ITEMS, write_fixture

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def toy_bundle() -> clipdecomp.ClipBundle:
    return clipdecomp.load("toy")


def blank(model, images, classifier):
    """A method whose maps are all zero."""
    return torch.zeros(images.shape[0], *images.shape[-2:])


def whole_set(data):
    images, masks = zip(*[(i, m) for i, m, _ in data.batches(100)])
    return torch.cat(images), torch.cat(masks)


def test_toy_set_holds_the_world_masks_and_classes(toy_bundle):
    data = segmentation_set(toy_bundle, "toy", n_images=10)
    samples = toy.sample(10, seed=7070, split="uniform")
    assert len(data) == 10 and len(data.class_names) == 36 and data.classifier.shape == (64, 36)
    assert data.class_names[6 * 5 + 2] == "yellow star"  # shape-major: index = 6 * shape + colour
    assert torch.equal(
        data.labels, torch.as_tensor(6 * samples.attributes["shape"] + samples.attributes["colour"])
    )
    assert [len(images) for images, _, _ in data.batches(4)] == [4, 4, 2]
    images, masks = whole_set(data)
    assert torch.equal(masks, torch.as_tensor(samples.masks))
    torch.testing.assert_close(images, toy_bundle.preprocess_batch(samples.images).cpu())


def test_compare_scores_each_method_like_the_whole_set_at_once(toy_bundle):
    data = segmentation_set(toy_bundle, "toy", n_images=10)
    methods = {"raw attention": segmentation.raw_attention, "blank": blank}
    result = compare(methods, toy_bundle, data, batch_size=4, n_show=6)
    images, masks = whole_set(data)
    table = result.table()
    assert list(table.index) == ["raw attention", "blank", REFERENCE]
    scores = segmentation_scores(segmentation.raw_attention(toy_bundle, images, data.classifier), masks)
    assert table.loc["raw attention", "mIoU"] == pytest.approx(scores.miou)
    assert table.loc["raw attention", "mAP"] == pytest.approx(scores.mean_ap)
    assert table.loc["raw attention", "pixel acc"] == pytest.approx(scores.pixel_accuracy)
    assert table.loc["raw attention", "fg AP (extra)"] == pytest.approx(scores.mean_ap_foreground)
    assert table.loc["blank", "blank maps"] == 1.0 and table.loc["raw attention", "blank maps"] == 0.0
    for metric in ("pixel acc", "mIoU", "mAP"):  # a blank map is "background everywhere"
        assert table.loc["blank", metric] == pytest.approx(table.loc[REFERENCE, metric])
    assert table.loc["raw attention", "time"] > 0 and math.isnan(table.loc[REFERENCE, "time"])
    assert result.object_share == pytest.approx(masks.float().mean().item())
    predicted = segmentation.predict(toy_bundle, images, data.classifier)
    assert torch.equal(result.predictions, predicted)
    assert result.accuracy == pytest.approx((predicted == data.labels).float().mean().item())
    right = int((predicted == data.labels).sum())
    assert len(result.by_correctness[("raw attention", True)].aps) == right
    assert len(result.by_correctness[("raw attention", False)].aps) == 10 - right
    split = result.split_table()
    assert list(split.index) == ["raw attention", "blank"]
    wrong = predicted != data.labels
    if wrong.any():
        maps = segmentation.raw_attention(toy_bundle, images[wrong], data.classifier)
        assert split.loc["raw attention", "mIoU (wrong)"] == pytest.approx(
            segmentation_scores(maps, masks[wrong]).miou
        )
    assert result.gallery.images.shape == (6, 3, 64, 64) and torch.equal(result.gallery.masks, masks[:6])
    torch.testing.assert_close(
        result.gallery.maps["raw attention"],
        segmentation.raw_attention(toy_bundle, images[:6], data.classifier),
    )
    assert result.beating(REFERENCE, "mIoU") == (
        ["raw attention"] if table.loc["raw attention", "mIoU"] > table.loc[REFERENCE, "mIoU"] else []
    )
    words = result.verdict("blank", ["mIoU"])
    assert words == (
        "best of the 2 on mIoU"
        if table.loc["blank", "mIoU"] >= table.loc["raw attention", "mIoU"]
        else "rank 2 of 2 on mIoU (behind raw attention)"
    )
    figure = plots.segmentation_gallery(result, data.class_names, toy_bundle.preprocess)
    assert len(figure.axes) == 6 * 3


def test_methods_by_name_or_function_and_clear_errors(toy_bundle):
    data = segmentation_set(toy_bundle, "toy", n_images=3)
    result = compare(["rollout", blank], toy_bundle, data)
    assert result.methods == ["rollout", "blank"]
    with pytest.raises(KeyError, match="Unknown method"):
        compare(["rolout"], toy_bundle, data)
    with pytest.raises(ValueError, match="at least one method"):
        compare({}, toy_bundle, data)
    with pytest.raises(ValueError, match="'toy' or 'imagenet-seg'"):
        segmentation_set(toy_bundle, "coco")
    with pytest.raises(FileNotFoundError, match="calvin-vision"):
        segmentation_set(toy_bundle, "imagenet-seg")


def test_imagenet_segmentation_file_without_labels(tmp_path):
    path = tmp_path / "gtsegs_ijcv.mat"
    write_fixture(path, ITEMS)
    bundle = tiny_bundle()
    data = segmentation_set(
        bundle,
        "imagenet-seg",
        path=path,
        n_images=None,
        class_names=["red box", "blue sky"],
        templates=["a {}."],
        mask_handling="authors",
    )
    assert len(data) == 3 and data.labels is None and str(data).startswith("gtsegs_ijcv.mat: 3 images")
    result = compare(["decomposition", "raw attention"], bundle, data, batch_size=2)
    images, masks = whole_set(data)
    assert masks.shape == (3, 32, 32)
    for name in ("decomposition", "raw attention"):
        maps = segmentation.METHODS[name](bundle, images, data.classifier)
        assert result.table().loc[name, "mIoU"] == pytest.approx(segmentation_scores(maps, masks).miou)
    assert result.accuracy is None and result.split_table().empty
    assert plots.percent(result.accuracy) == "n/a"
    assert (
        len(
            segmentation_set(
                bundle, "imagenet-seg", path=path, n_images=2, class_names=["x"], templates=["a {}."]
            )
        )
        == 2
    )


def test_published_table_is_in_fractions():
    table = published_table()
    assert table.loc["decomposition (paper)", "mIoU"] == pytest.approx(0.545)
    assert list(table.columns) == ["pixel acc", "mIoU", "mAP"] and (table.to_numpy() < 1).all()
