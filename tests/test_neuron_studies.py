"""Chapter 10's studies (clipdecomp.neuron_studies) on the toy world and on a real-format image folder."""

from __future__ import annotations

import clipdecomp
import pytest
import torch
from clipdecomp import neuron_studies as studies
from clipdecomp import second_order as so
from clipdecomp import sparse_texts
from clipdecomp.evaluation import evaluation_set
from clipdecomp.pools import load_pool
from test_datasets import make_folder

LAYER = 3


@pytest.fixture(scope="module")
def toy_bundle() -> clipdecomp.ClipBundle:
    torch.set_num_threads(1)
    return clipdecomp.load("toy")


def _study(bundle, dataset, cache_dir, n):
    fit = evaluation_set(bundle, dataset, n, seed=5, part=0)
    held = evaluation_set(bundle, dataset, n, seed=5, part=1)
    stats = so.SecondOrderStats.cached(
        bundle, fit.dataset, cache_dir, LAYER, top_k=2, indices=fit.indices, progress=False
    )
    evaluation = so.evaluate_layer(bundle, held.batches(16), stats)
    pool = load_pool("toy")
    embeddings = bundle.encode_text(pool)
    codes = sparse_texts.omp(stats.tensor("directions"), sparse_texts.text_dictionary(embeddings), 4)
    return fit, held, stats, evaluation, pool, embeddings, codes


def test_studies_on_the_toy_world(toy_bundle, tmp_path):
    fit, held, stats, evaluation, pool, embeddings, codes = _study(toy_bundle, "toy", tmp_path, 24)
    truth = studies.neuron_truth(held, evaluation, codes, pool, embeddings)
    assert truth.scores.shape == (evaluation.projections.shape[1], 5) and 0 <= truth.agree <= 1
    assert truth.facts()["agree"] == f"{truth.agree:.0%}" and truth.facts()["driver_verdict"].startswith(
        "most"
    )
    table = truth.table(codes, pool, stats.energy, LAYER).data
    assert len(table) == 6 and set(table["driving attribute"]) <= set(studies.ROLE_ATTRIBUTES)
    concepts = studies.discover_concepts(toy_bundle, held, LAYER, stats, codes, pool, batch_size=16)
    assert concepts.found.shape == (len(held), 5) and 0 <= concepts.hits <= 1 and 0 <= concepts.chance <= 1
    attack = studies.adversarial_words(toy_bundle, held, [stats], n_generated=300)
    assert len(attack.rates) == 30 and list(attack.rates.columns)[0] == "no word"  # 6 x 5 ordered pairs
    assert attack.facts()["fool_wins"].endswith("of 30") and attack.table().data.shape == (1, 4)
    sweep, baseline = studies.layer_sweep(toy_bundle, fit, held, batch_size=16)
    assert list(sweep.index) == list(range(toy_bundle.n_layers - 1))
    embeddings_now = torch.cat([toy_bundle.encode_image(b) for b in held.batches(16)])
    assert baseline == pytest.approx(held.mean_accuracy(embeddings_now), abs=1e-6)  # sum of parts == model


def test_studies_on_real_images_say_there_is_no_ground_truth(toy_bundle, tmp_path):
    root = make_folder(tmp_path / "val", {f"n{i:08d}": ["a.png", "b.png"] for i in range(1000)})
    _, held, stats, evaluation, pool, embeddings, codes = _study(toy_bundle, root, tmp_path / "caches", 6)
    truth = studies.neuron_truth(held, evaluation, codes, pool, embeddings)
    assert truth.scores is None and set(truth.facts().values()) == {studies.NO_TRUTH}
    assert list(truth.table(codes, pool, stats.energy, LAYER).data.columns) == ["top texts (coefficient)"]
    concepts = studies.discover_concepts(toy_bundle, held, LAYER, stats, codes, pool, batch_size=4)
    assert concepts.found.shape == (len(held), 5) and concepts.hits is None
    assert set(concepts.facts().values()) == {studies.NO_TRUTH}
    attack = studies.adversarial_words(toy_bundle, held, [stats], n_generated=60)
    assert attack.rates is None and attack.table().endswith(studies.NO_TRUTH)
    assert len(attack.facts()) == 5


def test_top_share_and_the_random_twin(toy_bundle, vit_b32):
    spread = torch.ones(100, 3)
    torch.testing.assert_close(studies.top_share(spread), torch.full((3,), 0.02))
    twin = studies.random_twin_of(toy_bundle)
    assert twin.spec == "toy (random init)" and twin.n_layers == toy_bundle.n_layers
    assert not torch.equal(twin.model.visual.conv1.weight, toy_bundle.model.visual.conv1.weight)
    real_twin = studies.random_twin_of(vit_b32)
    assert real_twin.n_layers == vit_b32.n_layers and real_twin.weights_sha256 is None
