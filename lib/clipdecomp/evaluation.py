"""Zero-shot evaluation sets: which images a chapter scores, their labels, and a classifier per task.

Chapters 2 and 3 score edited image embeddings (mean-ablated, reconstructed from texts) by zero-shot
accuracy. On the toy world the tasks are its attributes (shape, colour, position, size, background)
on held-out images; with real weights the task is ImageNet classification on a seeded subset of a
validation folder. :func:`evaluation_set` builds either one, and :meth:`EvaluationSet.decompose`
streams its decomposition into a :class:`~clipdecomp.cache.DecompositionCache`, so a long run on
ImageNet can be stopped and resumed, and a finished one is reused.

Example:
    >>> images = evaluation_set(bundle, "toy", n_images=100, seed=2024)
    >>> parts = images.decompose(bundle, tmp_path, layers=range(-4, 0), progress=False).to_decomposition()
    >>> accuracy = images.accuracies(parts.total())     # {"shape": 0.95, "colour": 1.0, ...} (fractions)
    >>> sorted(accuracy) == sorted(TOY_TASKS) and all(0 <= a <= 1 for a in accuracy.values())
    True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cache import DecompositionCache
from .datasets import DecomposableDataset, ImageFolderDataset, ToyDataset
from .decomposition import _check_layers
from .loading import ClipBundle
from .zero_shot import IMAGENET_CLASSNAMES, TOY_TASKS, task_accuracies, toy_classifiers, zero_shot_classifier

__all__ = ["EvaluationSet", "cache_folder", "evaluation_set"]


@dataclass
class EvaluationSet:
    """Images to score (positions ``indices`` of ``dataset``) and, per task, a classifier and its label.

    Attributes:
        name: a short name for cache folders ("toy" or the image folder's name).
        dataset: where the images come from.
        indices: the dataset positions scored, in order.
        classifiers: task -> [d', classes] zero-shot classifier.
        label_keys: task -> the name of its labels in ``dataset.labels``.
    """

    name: str
    dataset: DecomposableDataset
    indices: np.ndarray
    classifiers: dict[str, torch.Tensor]
    label_keys: dict[str, str]

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> dict[str, torch.Tensor]:
        """Task -> [n] integer labels of the scored images, in order."""
        return {
            task: torch.as_tensor(self.dataset.labels[key][self.indices])
            for task, key in self.label_keys.items()
        }

    def accuracies(self, embeddings: torch.Tensor) -> dict[str, float]:
        """Zero-shot top-1 accuracy (fraction) of [n, d'] embeddings of these images, per task."""
        if len(embeddings) != len(self):
            raise ValueError(f"{len(embeddings)} embeddings for an evaluation set of {len(self)} images.")
        return task_accuracies(embeddings, self.classifiers, self.labels())

    def mean_accuracy(self, embeddings: torch.Tensor) -> float:
        """The mean over tasks of :meth:`accuracies` (one number per edited embedding)."""
        scores = self.accuracies(embeddings)
        return sum(scores.values()) / len(scores)

    def batches(self, batch_size: int = 64) -> torch.utils.data.DataLoader:
        """The preprocessed images in order, ``batch_size`` at a time; re-iterable
        (for :func:`~clipdecomp.intervene`)."""
        subset = torch.utils.data.Subset(self.dataset, self.indices.tolist())
        return torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=_stack_images)

    def decompose(
        self,
        bundle: ClipBundle,
        cache_dir: str | Path,
        *,
        layers: Sequence[int] | None = None,
        batch_size: int = 64,
        progress: bool = True,
    ) -> DecompositionCache:
        """Decompose the images into a cache folder under ``cache_dir`` (``layers`` keep per-head detail).

        The folder's name is derived from the model, the images and ``layers``: the same call reuses a
        finished cache and resumes an interrupted one; a different call gets its own folder.
        """
        head_layers = _check_layers(layers, bundle.n_layers)
        folder = cache_folder(cache_dir, self.name, bundle, self.dataset, head_layers, self.indices)
        return DecompositionCache.build(
            bundle,
            self.dataset,
            folder,
            indices=self.indices,
            layers=head_layers,
            batch_size=batch_size,
            progress=progress,
        )


def cache_folder(
    cache_dir: str | Path,
    name: str,
    bundle: ClipBundle,
    dataset: DecomposableDataset,
    layers: Sequence[int],
    indices: np.ndarray | None = None,
) -> Path:
    """The folder under ``cache_dir`` for one decomposition: named from the model (spec and weights), the
    images and the layers, so the same inputs find their cache again and different ones (e.g. retrained
    weights) get a fresh folder instead of a stale-cache error."""
    inputs = {
        "model": bundle.spec,
        "weights": bundle.weights_sha256,
        "dataset": dataset.content_key(),
        "layers": list(layers),
        "indices": None
        if indices is None
        else hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    return (
        Path(cache_dir)
        / f"{name}-{bundle.spec.replace('/', '_')}-{len(dataset) if indices is None else len(indices)}-"
        f"{digest}"
    )


def _stack_images(items: list[tuple]) -> torch.Tensor:
    return torch.stack([item[0] for item in items])


def evaluation_set(
    bundle: ClipBundle, dataset: str | Path, n_images: int, seed: int = 0, part: int = 0
) -> EvaluationSet:
    """The chapters' zero-shot evaluation images: ``"toy"`` or an ImageNet validation folder.

    Args:
        bundle: the model; its preprocess and text tower build the dataset and classifiers.
        dataset: ``"toy"`` (held-out toy images, the five attribute tasks) or an image folder with one
            sub-folder per ImageNet class named by wnid (the 1,000-class task ``"imagenet"``).
        n_images: how many images.
        seed: which images (toy: the sampling seed; folder: the seed of a random subset).
        part: disjoint sets from one seed: part ``k`` is the ``k``-th block of ``n_images`` (toy:
            the seed ``seed + k``), e.g. part 0 to fit and part 1 to evaluate.
    """
    if n_images < 1 or part < 0:
        raise ValueError(f"n_images must be positive and part non-negative, got {n_images} and {part}.")
    if str(dataset) == "toy":
        data = ToyDataset(n_images, seed=seed + part, preprocess=bundle.preprocess, split="uniform")
        return EvaluationSet(
            "toy", data, np.arange(n_images), toy_classifiers(bundle), {task: task for task in TOY_TASKS}
        )
    data = ImageFolderDataset(dataset, bundle.preprocess)
    if len(data.classes) != len(IMAGENET_CLASSNAMES):
        raise ValueError(
            f"{data.root} has {len(data.classes)} class folders; the ImageNet task needs all "
            f"{len(IMAGENET_CLASSNAMES)} validation classes, one folder per wnid (n01440764, ...)."
        )
    if (part + 1) * n_images > len(data):
        raise ValueError(
            f"{data.root} holds {len(data)} readable images, too few for part {part} of "
            f"{n_images} images: lower n_images."
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).numpy()
    classifier = zero_shot_classifier(bundle, IMAGENET_CLASSNAMES, progress=True)
    return EvaluationSet(
        Path(data.root).name,
        data,
        order[part * n_images : (part + 1) * n_images],
        {"imagenet": classifier},
        {"imagenet": "label"},
    )
