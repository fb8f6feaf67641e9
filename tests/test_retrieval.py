"""Chapter 4's experiment (retrieval.evaluate) against brute-force neighbour counts and variance shares,
on the toy model and on tiny Waterbirds and image-folder fixtures."""

from __future__ import annotations

import clipdecomp
import numpy as np
import pytest
import torch
from clipdecomp import retrieval, toy
from test_cache import tiny_bundle
from test_datasets import make_folder, make_waterbirds


@pytest.fixture(scope="module")
def toy_bundle() -> clipdecomp.ClipBundle:
    return clipdecomp.load("toy")


def brute_agreement(terms: torch.Tensor, values: np.ndarray, k: int) -> float:
    """Mean over queries of the share of its k most similar other rows (by dot product) with its value."""
    scores = (terms.double() @ terms.double().T).numpy()
    shares = []
    for q in range(len(terms)):
        others = [j for j in np.argsort(-scores[q], kind="stable") if j != q][:k]
        shares.append(np.mean(values[others] == values[q]))
    return float(np.mean(shares))


def between_share(terms: torch.Tensor, values: np.ndarray) -> float:
    """Between-class share of the variance of [n, d] terms (one head's outputs)."""
    x = terms.double().numpy()
    centred = x - x.mean(0)
    between = sum((values == v).sum() * np.sum(centred[values == v].mean(0) ** 2) for v in np.unique(values))
    return float(between / np.sum(centred**2))


def test_toy_evaluation_matches_brute_force(toy_bundle):
    study = retrieval.evaluate(toy_bundle, "toy", 40, k=4, batch_size=40)
    samples = toy.sample(40, seed=4040, split="uniform")
    parts = clipdecomp.decompose(toy_bundle, toy_bundle.preprocess_batch(samples.images))
    torch.testing.assert_close(study.heads, parts.head_terms(), atol=1e-5, rtol=0)
    torch.testing.assert_close(study.embeddings, parts.total(), atol=1e-5, rtol=0)
    choose, measure = study.choose.numpy(), study.measure.numpy()
    assert sorted([*choose, *measure]) == list(range(40)) and len(choose) == 20 and study.k == 4
    table = study.table()
    assert list(table.index) == [f"{p} head L{l}H{h}" for p, (l, h) in study.chosen.items()] + [
        "full embedding",
        "chance",
    ]
    for p in retrieval.TOY_PROPERTIES:
        values = samples.attributes[p]
        assert np.array_equal(study.images.labels[p], values)
        scores = {
            (layer, h): between_share(parts.heads[choose, i, h], values[choose])
            for i, layer in enumerate(parts.head_layers)
            for h in range(parts.n_heads)
        }
        assert study.chosen[p] == max(scores, key=scores.get)
        agreement = {
            (layer, h): brute_agreement(parts.heads[choose, i, h], values[choose], 4)
            for i, layer in enumerate(parts.head_layers)
            for h in range(parts.n_heads)
        }
        assert agreement[study.best_retrieval[p]] == pytest.approx(max(agreement.values()))
        same = values[measure][:, None] == values[measure][None]
        assert table.loc["chance", p] == pytest.approx(
            (same.sum() - len(measure)) / (len(measure) * (len(measure) - 1))
        )
        assert table.loc["full embedding", p] == pytest.approx(
            brute_agreement(parts.total()[measure], values[measure], 4)
        )
        layer, head = study.chosen[p]
        own = brute_agreement(parts.heads[measure, parts.head_layers.index(layer), head], values[measure], 4)
        assert study.summary().loc[p, "own"] == pytest.approx(own)
    picks = study.picks()
    assert set(picks["same head"]) <= {"✓", "✗"}
    assert (picks["same head"] == "✓").sum() == sum(
        study.chosen[p] == study.best_retrieval[p] for p in study.properties
    )
    query = int(study.measure[0])
    found = study.neighbours(query, 3)
    assert list(found) == list(study.similarities())
    assert all(len(v) == 3 and query not in v and set(v) <= set(measure.tolist()) for v in found.values())


def test_real_folders_give_their_labels_as_properties(tmp_path):
    bundle = tiny_bundle()
    rows = [(f"birds/{i:02d}.png", i % 2, 2, (i // 2) % 2) for i in range(12)]
    waterbirds = make_waterbirds(tmp_path / "wb", rows)
    study = retrieval.evaluate(bundle, waterbirds, 10, k=3, seed=1, batch_size=4)
    assert study.properties == ["bird", "place"]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:10].numpy()
    assert np.array_equal(study.images.indices, order)
    assert np.array_equal(study.images.labels["bird"], np.array([r[1] for r in rows])[order])
    assert np.array_equal(study.images.labels["place"], np.array([r[3] for r in rows])[order])
    assert study.images.describe(0)["bird"] in ("landbird", "waterbird")
    measure = study.measure.numpy()
    table = study.table()
    for p in study.properties:
        values = study.images.labels[p][measure]
        assert table.loc["chance", p] == pytest.approx(retrieval.chance_agreement(values))
        assert table.loc["full embedding", p] == pytest.approx(
            brute_agreement(study.embeddings[measure], values, 3)
        )
    folder = make_folder(
        tmp_path / "val", {"n01": ["a.png", "b.png", "c.png"], "n02": ["d.png", "e.png", "f.png"]}
    )
    study = retrieval.evaluate(bundle, folder, 6, k=1, batch_size=6)
    assert study.properties == ["class"] and study.images.value_names["class"] == ["n01", "n02"]
    assert sorted(study.images.labels["class"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_bad_requests_say_what_to_change(toy_bundle, tmp_path):
    with pytest.raises(ValueError, match="choose among"):
        retrieval.property_images(toy_bundle, "toy", 8, properties=["smell"])
    folder = make_folder(tmp_path / "val", {"n01": ["a.png", "b.png"], "n02": ["c.png", "d.png"]})
    with pytest.raises(ValueError, match="fewer than n_images"):
        retrieval.property_images(tiny_bundle(), folder, 9)
    study = retrieval.evaluate(toy_bundle, "toy", 8, k=8, batch_size=8)
    assert study.k == 3  # lowered to fit halves of four images
    with pytest.raises(KeyError, match="L9H0"):
        study.head(9, 0)
    with pytest.raises(ValueError, match="measure half"):
        study.neighbours(int(study.choose[0]), 2)
