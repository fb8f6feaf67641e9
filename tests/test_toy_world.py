"""The toy world: determinism, formats, ground truth and the spurious-correlation recipe."""

from __future__ import annotations

import numpy as np
import pytest
from clipdecomp.toy import world
from clipdecomp.toy.world import ATTRIBUTES, CAPTION_ATTRIBUTES, sample, spurious_split


@pytest.fixture(scope="module")
def train() -> world.ToySamples:
    return sample(1500, seed=3, split="train")


def test_deterministic_and_seed_dependent():
    a, b = sample(64, seed=7, hard_negatives=0.5), sample(64, seed=7, hard_negatives=0.5)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert a.captions == b.captions and np.array_equal(a.mentions, b.mentions)
    assert all(np.array_equal(a.attributes[k], b.attributes[k]) for k in a.attributes)
    assert not np.array_equal(a.images, sample(64, seed=8).images)
    assert not np.array_equal(sample(64, 7, split="uniform").images, sample(64, 7, split="train").images)


def test_shapes_dtypes_and_ranges(train):
    n = len(train)
    assert train.images.shape == (n, 64, 64, 3) and train.images.dtype == np.uint8
    assert train.masks.shape == (n, 64, 64) and train.masks.dtype == bool
    assert train.mentions.shape == (n, len(CAPTION_ATTRIBUTES)) and train.mentions.any(1).all()
    assert len(train.captions) == n
    for name, values in ATTRIBUTES.items():
        assert train.attributes[name].shape == (n,)
        assert set(np.unique(train.attributes[name])) == set(range(len(values))), name
    assert len(ATTRIBUTES["shape"]) >= 6 and len(ATTRIBUTES["colour"]) >= 6
    assert len(ATTRIBUTES["position"]) == 9 and len(ATTRIBUTES["background"]) >= 5


def test_masks_are_the_object_pixels():
    s = sample(200, seed=1, split="uniform")
    area = s.masks.sum((1, 2))
    assert (area > 40).all() and (area < 0.25 * 64 * 64).all()
    assert area[s.attributes["size"] == 1].mean() > 1.5 * area[s.attributes["size"] == 0].mean()  # (16/12)^2
    for i in range(len(s)):
        colour = world.COLOURS_RGB[s.attributes["colour"][i]]
        inside = s.images[i][s.masks[i]].astype(float).mean(0)
        assert np.abs(inside - colour).max() < 45, i  # object pixels have the object's colour
        row, col = np.argwhere(s.masks[i]).mean(0)  # the mask sits in its grid cell
        p = s.attributes["position"][i]
        assert abs(row - world.GRID[p // 3]) < 6 and abs(col - world.GRID[p % 3]) < 6


def test_label_and_place_follow_shape_and_background(train):
    a = train.attributes
    assert np.array_equal(a["label"], (a["shape"] >= 3).astype(int))
    assert np.array_equal(a["place"], (a["background"] >= 2).astype(int))


@pytest.mark.parametrize("hard_negatives", [0.0, 0.5])
def test_spurious_correlation_in_train(hard_negatives):
    a = sample(1500, seed=3, split="train", hard_negatives=hard_negatives).attributes
    agree = np.mean(a["label"] == a["place"])
    assert agree >= 0.9 and agree < 0.99


def test_balanced_groups_and_uniform_split():
    g = spurious_split(400, seed=5).attributes
    group = 2 * g["label"] + g["place"]
    assert np.array_equal(group, np.arange(400) % 4)
    u = sample(1500, seed=5, split="uniform").attributes
    assert abs(np.mean(u["label"] == u["place"]) - 0.5) < 0.06


def test_captions_name_exactly_the_attributes_they_claim(train):
    single = train.mentions.sum(1) == 1
    assert 0.4 < single.mean() < 0.6
    for i in range(500):
        caption, names = train.captions[i], train.describe(i)
        for col, attr in enumerate(CAPTION_ATTRIBUTES):
            if train.mentions[i, col]:
                assert names[attr] in caption, (caption, attr)
        if not train.mentions[i, CAPTION_ATTRIBUTES.index("background")]:
            assert not any(f"on {bg}" in caption for bg in ATTRIBUTES["background"]), caption
        if not train.mentions[i, CAPTION_ATTRIBUTES.index("colour")]:
            assert not any(c in caption.split() for c in ATTRIBUTES["colour"]), caption


def test_hard_negative_groups_differ_in_their_focus_only():
    s = sample(64, seed=2, hard_negatives=0.5)
    for g in range(8):
        rows = np.arange(4 * g, 4 * g + 4)
        fixed = [k for k in CAPTION_ATTRIBUTES if len(np.unique(s.attributes[k][rows])) == 1]
        assert len(fixed) >= len(CAPTION_ATTRIBUTES) - 2  # the focus (and maybe its label) vary
        focus = {CAPTION_ATTRIBUTES[c] for c in np.flatnonzero(s.mentions[rows].all(0))}
        varying = set(CAPTION_ATTRIBUTES) - set(fixed) - {"label"}
        assert varying <= focus


def test_prompts_cover_every_class():
    for attr in list(world.PROMPTS):
        prompts = world.class_prompts(attr)
        assert len(prompts) == len(ATTRIBUTES[attr])
        assert len({len(p) for p in prompts}) == 1
        assert all(value in p for value, group in zip(ATTRIBUTES[attr], prompts) for p in group)
        assert not any(" a o" in p or " a a" in p for group in prompts for p in group)


def test_fast_enough():
    import time

    start = time.process_time()
    sample(500, seed=0, hard_negatives=0.5)
    assert time.process_time() - start < 2.0


def test_label_captions_only_for_majority_images_when_asked():
    s = sample(2000, seed=11, single_rate=0.3, hard_negatives=0.5, label_majority=True)
    minority = s.attributes["label"] != s.attributes["place"]
    col = CAPTION_ATTRIBUTES.index("label")
    assert minority.any() and not s.mentions[minority, col].any()
    assert s.mentions[~minority, col].mean() > 0.05 and s.mentions.any(1).all()


def test_focus_rates_and_hard_negative_mix():
    s = sample(4000, seed=12, single_rate=1.0, shape_rate=1.0)
    assert s.mentions[:, CAPTION_ATTRIBUTES.index("shape")].all()
    groups = sample(4 * 400, seed=13, hard_negatives=1.0, hn_position=0.0, hn_shape=1.0).attributes
    shapes = groups["shape"].reshape(-1, 4)
    assert (shapes // 3 == shapes[:, :1] // 3).all()  # the label holds within a group
    assert np.mean([len(set(row)) > 1 for row in shapes]) > 0.5  # the shape varies
    with pytest.raises(ValueError, match="shape_rate"):
        sample(4, shape_rate=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        sample(4, position_rate=0.6, shape_rate=0.6)


def test_objects_cover_at_least_twelve_percent_of_the_pixels():
    assert sample(1000, seed=14, split="uniform").masks.mean() >= 0.12
