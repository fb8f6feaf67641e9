"""Evaluation sets: the right images and labels, cached decompositions reused and resumed, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from clipdecomp.evaluation import evaluation_set
from clipdecomp.toy import sample
from PIL import Image
from test_cache import tiny_bundle

torch.set_num_threads(1)


def test_toy_set_scores_the_decomposition_like_the_embeddings(tmp_path):
    bundle = tiny_bundle()
    images = evaluation_set(bundle, "toy", n_images=6, seed=5)
    expected = sample(6, 5, split="uniform")
    assert images.labels()["shape"].tolist() == expected.attributes["shape"].tolist()
    cache = images.decompose(bundle, tmp_path, layers=[-1], progress=False)
    parts = cache.to_decomposition()
    embeddings = bundle.encode_image(torch.cat(list(images.batches(4))))
    assert images.accuracies(parts.total()) == images.accuracies(embeddings)
    assert (
        set(images.accuracies(embeddings))
        == set(images.classifiers)
        == {"shape", "colour", "position", "size", "background"}
    )
    # the same call reuses the finished cache; other layers or another part get their own folder
    finished = json.loads((cache.folder / "manifest.json").read_text())["finished"]
    again = images.decompose(bundle, tmp_path, layers=[-1], progress=False)
    assert (
        again.folder == cache.folder
        and json.loads((again.folder / "manifest.json").read_text())["finished"] == finished
    )
    other = evaluation_set(bundle, "toy", n_images=6, seed=5, part=1).decompose(
        bundle, tmp_path, layers=[-1], progress=False
    )
    assert images.decompose(bundle, tmp_path, layers=[], progress=False).folder not in (
        cache.folder,
        other.folder,
    )
    assert other.folder != cache.folder and other.ids != cache.ids


def test_accuracies_refuse_embeddings_of_another_size():
    images = evaluation_set(tiny_bundle(), "toy", n_images=4)
    with pytest.raises(ValueError, match="4 images"):
        images.accuracies(torch.zeros(3, 24))


def test_image_folder_needs_every_imagenet_class(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (40, 40), "red").save(tmp_path / wnid / "a.JPEG")
    with pytest.raises(ValueError, match="2 class folders.*1000"):
        evaluation_set(tiny_bundle(), tmp_path, n_images=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation_set(tiny_bundle(), tmp_path / "missing", n_images=2)
