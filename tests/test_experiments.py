"""Chapter experiments owned by the library: spurious-cue task, TEXT SPAN reconstruction, ground-truth roles.

Each runs on the shipped toy model, and the real-data branch on the tiny real-format fixtures the
tests write (a Waterbirds folder, an ImageNet-style folder), so what readers run with real weights
is exercised here too.
"""

from __future__ import annotations

import clipdecomp
import numpy as np
import pytest
import torch
from clipdecomp import spurious
from clipdecomp.evaluation import evaluation_set
from clipdecomp.text_span import describe_heads, reconstruct_heads, reconstruction_curve, text_span_heads
from clipdecomp.toy import groundtruth
from test_datasets import make_folder, make_waterbirds


@pytest.fixture(scope="module")
def toy_bundle() -> clipdecomp.ClipBundle:
    torch.set_num_threads(1)
    return clipdecomp.load("toy")


def test_spurious_task_on_the_toy_world(toy_bundle, tmp_path):
    task = spurious.spurious_task(toy_bundle, "toy", n_test=48, n_val=40, last_k=2, cache_dir=tmp_path)
    assert task.name == "toy" and task.search_layers == [4, 5] and task.examples.shape == (8, 64, 64, 3)
    assert torch.equal(task.test.group, torch.arange(48) % 4) and task.classifier.shape == (64, 2)
    result = task.compare(max_heads=3, random_trials=2, n_boot=20)
    assert [head for head, _ in result.ranked][: len(result.chosen)] == result.chosen
    fractions = [f for _, f in result.ranked]
    assert fractions == sorted(fractions, reverse=True) and all(0 <= f <= 1 for f in fractions)
    assert set(result.val_scores) == {0, 1, 2, 3} and len(result.chosen) <= 3
    best = max(result.val_scores.values())
    assert result.val_scores[len(result.chosen)] == best  # validation decides
    base = task.report(n_boot=20)
    assert result.base.worst_group == base.worst_group == min(base.per_group.values())
    groups = base.group_table(task.group_names)
    assert list(groups.index) == task.group_names and groups.iloc[0, 0] == f"{base.per_group[0]:.1%}"
    expected = (task.predictions(task.test) == task.test.y).float().mean().item()
    assert result.base.average == pytest.approx(expected)
    table = result.table()
    assert "base" in table.index and table.loc["base", "worst group"].endswith("]")
    assert set(result.gains()) == {"chosen", "best random", "mean random"}
    names, with_cue, within = task.signal()
    assert len(names) == len(with_cue) == len(within) and "embed" in names
    again = spurious.spurious_task(toy_bundle, "toy", n_test=48, n_val=40, last_k=2, cache_dir=tmp_path)
    torch.testing.assert_close(again.test.parts.total(), task.test.parts.total())  # reused from the cache


def test_spurious_task_on_a_waterbirds_folder(toy_bundle, tmp_path):
    rows = [
        (f"{i:03d}.Bird/{split}_{i}.jpg", (i // 2) % 2, split, i % 2) for split in (1, 2) for i in range(8)
    ]
    root = make_waterbirds(
        tmp_path / "waterbird_complete95_forest2water2", rows + [("001.Bird/train.jpg", 0, 0, 0)]
    )
    task = spurious.spurious_task(toy_bundle, root, last_k=1, cache_dir=tmp_path / "caches")
    assert task.name == "waterbirds" and task.class_names == ["landbird", "waterbird"]
    assert len(task.val.y) == len(task.test.y) == 8 and len(task.examples) == 8
    assert (
        task.examples[0].dtype == np.uint8 and task.examples[0].ndim == 3 and task.text_pool == "descriptions"
    )
    assert task.test.group.tolist() == [2 * y + p for _, y, s, p in rows if s == 2]
    assert task.concept.shape == (len(spurious.WATERBIRDS_PLACES), 64)
    result = task.compare(max_heads=2, random_trials=1, n_boot=5)
    assert "authors' heads" not in result.rows  # no published list for the toy architecture
    assert result.base.average == pytest.approx(
        (task.predictions(task.test) == task.test.y).float().mean().item()
    )


def test_spurious_task_rejects_bad_sizes(toy_bundle, tmp_path):
    for bad in ({"n_test": 2}, {"last_k": 0}, {"n_val": 10.0}, {"batch_size": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            spurious.spurious_task(toy_bundle, "toy", cache_dir=tmp_path, **bad)


@pytest.fixture(scope="module")
def fitted(toy_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("caches")
    fit, held_out = (evaluation_set(toy_bundle, "toy", 40, seed=5, part=part) for part in (0, 1))
    parts_fit, parts_eval = (
        images.decompose(toy_bundle, folder, layers=[4, 5], progress=False).to_decomposition()
        for images in (fit, held_out)
    )
    pool = [
        "a red object",
        "a circle",
        "a star",
        "something on sand",
        "an object in the top left",
        "a small object",
        "a blue object",
        "a photo of water",
    ]
    spans = text_span_heads(parts_fit, toy_bundle.encode_text(pool), m=4, rank=16)
    return fit, held_out, parts_fit, parts_eval, pool, spans


def test_reconstruction_is_exact_with_the_whole_space_and_the_mean_with_none(fitted):
    fit, held_out, parts_fit, parts_eval, pool, spans = fitted
    mean_only = reconstruct_heads(parts_eval, spans, 0, parts_fit)
    expected = parts_eval.embedding + parts_eval.mlps.sum(1) + parts_fit.attns[:, :4].mean(0).sum(0)
    expected = (
        expected + sum(spans[f"L{l}H{h}"].mean for l in (4, 5) for h in range(parts_eval.n_heads)).float()
    )
    torch.testing.assert_close(mean_only, expected, atol=1e-5, rtol=0)
    intact, curve = reconstruction_curve(
        parts_eval, parts_fit, {"pool": spans}, [0, 2, 4], held_out.mean_accuracy
    )
    assert list(curve.index) == [0, 2, 4] and list(curve.columns) == ["pool"]
    assert curve.loc[0, "pool"] == pytest.approx(held_out.mean_accuracy(mean_only))
    assert 0 <= intact <= 1
    with pytest.raises(KeyError, match="No TEXT SPAN result"):
        reconstruct_heads(parts_eval, {"L4H0": spans["L4H0"]}, 1, parts_fit)
    table = describe_heads(spans, pool, first=2)
    assert list(table.index) == list(spans) and table.iloc[0, 1].endswith("%")


def test_text_span_agreement_on_toy_and_none_for_real_images(toy_bundle, fitted, tmp_path):
    fit, _, parts_fit, _, pool, spans = fitted
    agreement = groundtruth.text_span_agreement(toy_bundle, fit, parts_fit, spans, pool)
    assert list(agreement.table.index) == list(spans) and 0 <= agreement.agree <= agreement.with_role
    twin = agreement.twin.table()
    assert (twin["background"] > 0.5).all() and (twin.drop(columns="background") < 0.3).all().all()
    root = make_folder(tmp_path / "val", {f"n{i:08d}": ["a.png"] for i in range(1000)})
    real = evaluation_set(toy_bundle, root, 4, seed=0)
    facts = agreement.facts()
    assert facts["gt_agree"] == f"{agreement.agree} of the {agreement.with_role} heads"
    assert float(facts["gt_twin_background"]) == pytest.approx(twin["background"].min(), abs=0.005)
    none = groundtruth.text_span_agreement(toy_bundle, real, parts_fit, spans, pool)
    assert none.scores is None and none.agree == none.with_role == 0
    assert set(none.facts().values()) == {groundtruth.NO_TRUTH} and len(none.facts()) == len(facts)


def test_head_cards_rank_heads_by_explained_variance_and_ablate_each(toy_bundle):
    from clipdecomp import pools, toy
    from clipdecomp.ablation import mean_ablate
    from clipdecomp.explorer import HeadCard
    from clipdecomp.zero_shot import task_accuracies, toy_classifiers

    samples = toy.sample(48, seed=3, split="uniform")
    parts = clipdecomp.decompose(toy_bundle, toy_bundle.preprocess_batch(samples.images), layers=[-1])
    pool = pools.load_pool("toy")
    spans = text_span_heads(parts, toy_bundle.encode_text(pool), m=3)
    classifiers = toy_classifiers(toy_bundle)
    cards = HeadCard.best(parts, spans, pool, classifiers, samples.attributes, n=2)
    explained = {label: float(span.cumulative_explained[-1]) for label, span in spans.items()}
    assert [c.label for c in cards] == sorted(explained, key=explained.get, reverse=True)[:2]
    first = cards[0]
    assert first.texts == spans[first.label].texts(pool)
    assert first.ablated_accuracy == task_accuracies(
        mean_ablate(parts, [first.label]), classifiers, samples.attributes
    )


def test_encode_pools_with_and_without_the_random_control(toy_bundle):
    from clipdecomp.pools import encode_pools, load_pool, random_directions

    texts, embeddings = encode_pools(toy_bundle, ["toy", "random"], control_size="toy")
    assert texts["toy"] == load_pool("toy") and len(texts["random"]) == len(texts["toy"])
    torch.testing.assert_close(embeddings["random"], random_directions(len(texts["toy"]), 64, seed=0))
    assert set(encode_pools(toy_bundle, ["toy"])[0]) == {"toy"}
    with pytest.raises(ValueError, match="needs control_size"):
        encode_pools(toy_bundle, ["toy", "random"])
    with pytest.raises(ValueError, match="must name one of the pools"):
        encode_pools(toy_bundle, ["toy", "random"], control_size="words")
