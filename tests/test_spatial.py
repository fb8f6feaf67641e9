"""Chapter 5's experiment (spatial.class_contrasts and its pointing game) against a direct calculation from
the spatial decomposition, on the toy model and on a tiny ImageNet-segmentation file."""

from __future__ import annotations

import clipdecomp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clipdecomp import plots, spatial, toy
from test_cache import tiny_bundle
from test_imagenet_seg import ITEMS, write_fixture


@pytest.fixture(scope="module")
def toy_bundle() -> clipdecomp.ClipBundle:
    return clipdecomp.load("toy")


def direct_hits(bundle, images: torch.Tensor, directions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Hottest pixel of each image's own map, computed from decompose() by hand: is it in the mask?"""
    parts = clipdecomp.decompose(bundle, images, spatial=True)
    patches = parts.heads[:, :, 1:].sum((1, 3))  # [B, patches, d']
    scores = (patches * directions[:, None]).sum(-1).reshape(len(images), 1, *parts.grid_size)
    heat = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return torch.tensor([bool(mask.flatten()[int(h.flatten().argmax())]) for h, mask in zip(heat, masks)])


def test_toy_contrasts_and_pointing_game(toy_bundle):
    study = spatial.class_contrasts(toy_bundle, "toy", 12, batch_size=5)
    samples = toy.sample(12, seed=5050, split="uniform")
    assert list(study.contrasts) == ["colour", "shape", "background"] and study.size == (64, 64)
    assert torch.equal(study.masks, torch.as_tensor(samples.masks))
    assert study.object_share == pytest.approx(samples.masks.mean())
    game = study.pointing_game()
    assert list(game.index) == ["colour", "shape", "background"]
    for family, on_object in spatial.TOY_CONTRASTS.items():
        weights = clipdecomp.zero_shot_classifier(
            toy_bundle, toy.ATTRIBUTES[family], toy.prompt_templates(family)
        )
        own = (weights - weights.mean(1, keepdim=True)).T[samples.attributes[family]]
        torch.testing.assert_close(study.contrasts[family].own(), own, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            study.contrasts[family].own(centred=False), weights.T[samples.attributes[family]]
        )
        hits = direct_hits(toy_bundle, study.images, own, study.masks)
        rate = (hits if on_object else ~hits).float().mean().item()
        assert game.loc[family, "hit rate"] == pytest.approx(rate)
        chance = study.object_share if on_object else 1 - study.object_share
        assert game.loc[family, "chance"] == pytest.approx(chance)
    names = [t for t, _ in study.texts(3)]
    assert names == [toy.ATTRIBUTES[a][samples.attributes[a][3]] for a in spatial.TOY_CONTRASTS]
    last = study.pointing_game(heads=[(5, h) for h in range(toy_bundle.n_heads)])
    assert (
        list(last.columns) == ["hit rate", "chance", "a hit means"] and last["hit rate"].between(0, 1).all()
    )


def test_per_image_directions_and_joint_maps_agree_with_single_ones(toy_bundle):
    study = spatial.class_contrasts(toy_bundle, "toy", 4)
    directions = study.contrasts["shape"].own()
    together = spatial.patch_scores(study.parts, directions)
    one_by_one = torch.stack([spatial.patch_scores(study.parts, d)[i] for i, d in enumerate(directions)])
    torch.testing.assert_close(together, one_by_one, atol=1e-6, rtol=0)
    maps = spatial.joint_maps(study.parts, directions)
    assert maps.shape == (4, 6, 4, 8, 8)
    torch.testing.assert_close(maps.sum((1, 2)), together, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        maps[:, 2, 3], spatial.joint_map(study.parts, 2, 3, directions), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="one per image"):
        spatial.patch_scores(study.parts, directions[:3])
    planted = torch.zeros(2, 3, 2, 2)
    planted[1, 2] = 1.0
    planted[0, 0] = 3.0
    assert spatial.strongest_head(planted, [4, 5]) == ((4, 0), 0.75)


def test_imagenet_segmentation_photos_with_their_predicted_class(tmp_path):
    path = tmp_path / "gtsegs_ijcv.mat"
    write_fixture(path, ITEMS)
    bundle, names = tiny_bundle(), ["red box", "blue sky", "green field"]
    study = spatial.class_contrasts(bundle, path, 5, class_names=names, templates=["a {}."])
    assert study.name == "gtsegs_ijcv.mat" and len(study) == 3 and study.masks.shape == (3, 32, 32)
    classifier = clipdecomp.zero_shot_classifier(bundle, names, ["a {}."])
    top = (clipdecomp.decompose(bundle, study.images).total() @ classifier).topk(2).indices
    assert torch.equal(study.contrasts["predicted class"].labels, top[:, 0])
    assert torch.equal(study.contrasts["runner-up class"].labels, top[:, 1])
    assert study.pairs == [("predicted class", "runner-up class")]
    game = study.pointing_game()
    assert list(game.index) == ["predicted class"]  # the runner-up is not scored
    own = study.contrasts["predicted class"].own()
    rate = direct_hits(bundle, study.images, own, study.masks).float().mean().item()
    assert game.loc["predicted class", "hit rate"] == pytest.approx(rate)
    assert game.loc["predicted class", "chance"] == pytest.approx(study.masks.float().mean().item())
    with pytest.raises(FileNotFoundError, match="calvin-vision"):
        spatial.class_contrasts(bundle, tmp_path / "absent.mat", 2)


def test_pictures_undo_the_preprocess(toy_bundle):
    images = toy.sample(2, seed=0, split="uniform").images
    shown = plots.pictures(toy_bundle.preprocess, toy_bundle.preprocess_batch(images))
    assert shown.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(shown, images / 255, atol=1e-5)
    assert (
        plots.percent(0.1234) == "12.3%"
        and plots.percent(None) == "n/a"
        and plots.percent(float("nan")) == "n/a"
    )
