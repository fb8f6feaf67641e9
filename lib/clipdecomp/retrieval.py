"""Property-specific retrieval: nearest neighbours under one head's direct contribution.

Two images are similar *for head (l, h)* when that head writes similar vectors for them: the
similarity is the dot product of their head terms. A colour head retrieves same-colour images, a
shape head same-shape ones; the full embedding mixes every property.

:func:`evaluate` is chapter 4's experiment in one call. It decomposes images whose properties are
known (:func:`property_images`: toy attributes, Waterbirds' bird and place, an image folder's
class), splits them in two halves, picks per property the head with the highest ground-truth score
(:mod:`clipdecomp.toy.groundtruth`: the share of the head's output variance the property explains)
on the first half, and measures on the second half how often each head's nearest neighbours share
the query's property, against the full embedding and chance.

Example:
    >>> import clipdecomp
    >>> study = evaluate(clipdecomp.load("toy"), "toy", n_images=40, k=4)
    >>> sorted(study.chosen) == sorted(TOY_PROPERTIES)     # property -> (layer, head)
    True
    >>> bool(study.table().loc["chance"].between(0, 1).all())   # agreement of random neighbours, a fraction
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .datasets import DecomposableDataset, ImageFolderDataset, ToyDataset, WaterbirdsDataset
from .decomposition import decompose_batches
from .loading import ClipBundle
from .toy import groundtruth, world

__all__ = [
    "similarities",
    "nearest",
    "neighbour_agreement",
    "agreement_by_head",
    "chance_agreement",
    "PropertyImages",
    "RetrievalEvaluation",
    "property_images",
    "evaluate",
    "TOY_PROPERTIES",
]

TOY_PROPERTIES = ("colour", "shape", "position")
"""The toy attributes chapter 4 retrieves by (``size`` and ``background`` can be added)."""


def similarities(terms: torch.Tensor, query: int | torch.Tensor) -> torch.Tensor:
    """[n] dot products between each row of ``terms`` ([n, d']) and the query (a row index or a [d']
    vector)."""
    vector = terms[query] if isinstance(query, int) else query
    return terms @ vector.to(terms)


def nearest(terms: torch.Tensor, query: int, k: int = 8, exclude_self: bool = True) -> torch.Tensor:
    """Indices of the ``k`` rows of ``terms`` most similar to row ``query`` (best first)."""
    if not 0 <= query < len(terms):
        raise IndexError(f"query {query} out of range for {len(terms)} images.")
    scores = similarities(terms, query).clone()
    if exclude_self:
        scores[query] = -torch.inf
    return scores.topk(min(k, len(terms) - int(exclude_self))).indices


def neighbour_agreement(terms: torch.Tensor, values: torch.Tensor | np.ndarray, k: int = 8) -> torch.Tensor:
    """[n] for each image, the fraction of its ``k`` nearest neighbours that share its attribute value.

    Neighbours are ranked by the dot product of ``terms`` ([n, d'], e.g. one head's direct terms, as in
    :func:`nearest`); an image is never its own neighbour.
    """
    values = torch.as_tensor(values)
    if len(values) != len(terms):
        raise ValueError(f"{len(terms)} rows of terms but {len(values)} attribute values.")
    if not 1 <= k < len(terms):
        raise ValueError(f"k={k} neighbours needs 1 <= k < n images ({len(terms)}).")
    scores = terms.float() @ terms.float().T
    scores.fill_diagonal_(-torch.inf)
    neighbours = scores.topk(k, dim=1).indices
    return (values[neighbours] == values[:, None]).float().mean(1)


def agreement_by_head(
    head_terms: torch.Tensor, values: torch.Tensor | np.ndarray, k: int = 8
) -> torch.Tensor:
    """[L', H] mean :func:`neighbour_agreement` of each head's terms ([n, L', H, d'])."""
    return torch.tensor(
        [
            [
                neighbour_agreement(head_terms[:, layer, head], values, k).mean().item()
                for head in range(head_terms.shape[2])
            ]
            for layer in range(head_terms.shape[1])
        ]
    )


def chance_agreement(values: torch.Tensor | np.ndarray) -> float:
    """Expected :func:`neighbour_agreement` of neighbours drawn at random from the other images."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    n = counts.sum()
    if n < 2:
        raise ValueError(f"chance_agreement needs at least 2 images, got {n}.")
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


@dataclass
class PropertyImages:
    """Images whose properties are known: positions ``indices`` of ``dataset`` and their property values.

    Attributes:
        dataset: where the images come from (its ``preprocess`` made them model inputs).
        indices: the dataset positions used, in order.
        labels: property -> int array [n] of each image's value.
        value_names: property -> the name of each value (``value_names[p][labels[p][i]]``).
    """

    dataset: DecomposableDataset
    indices: np.ndarray
    labels: dict[str, np.ndarray]
    value_names: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def properties(self) -> list[str]:
        return list(self.labels)

    def images(self, positions: Sequence[int] | None = None) -> torch.Tensor:
        """[n, 3, H, W] the preprocessed images, in order (or only those at ``positions``)."""
        chosen = self.indices if positions is None else self.indices[list(positions)]
        return torch.stack([self.dataset.image(int(i)) for i in chosen])

    def describe(self, i: int) -> dict[str, str]:
        """Property -> value name of image ``i``, e.g. ``{"colour": "red", "shape": "star", ...}``."""
        return {p: self.value_names[p][int(values[i])] for p, values in self.labels.items()}


def property_images(
    bundle: ClipBundle,
    dataset: str | Path = "toy",
    n_images: int = 600,
    *,
    seed: int = 4040,
    properties: Sequence[str] | None = None,
) -> PropertyImages:
    """Images with known properties for a retrieval evaluation.

    Args:
        bundle: the model whose preprocess prepares the images.
        dataset: ``"toy"`` (the ``uniform`` split, every attribute independent; default properties
            :data:`TOY_PROPERTIES`), a Waterbirds folder (holding ``metadata.csv``; properties
            ``"bird"`` and ``"place"``) or an image folder with one sub-folder per class (``"class"``).
        n_images: how many images (a seeded random subset of a folder).
        seed: toy: the sampling seed (never a training seed); folder: the seed of the subset.
        properties: which properties to keep (default: all the source has, toy: :data:`TOY_PROPERTIES`).
    """
    if n_images < 4:
        raise ValueError(f"n_images must be at least 4 (two halves of two images), got {n_images}.")
    if str(dataset) == "toy":
        data: DecomposableDataset = ToyDataset(
            n_images, seed=seed, preprocess=bundle.preprocess, split="uniform"
        )
        available = {a: (a, world.ATTRIBUTES[a]) for a in groundtruth.ROLE_ATTRIBUTES}
        properties = TOY_PROPERTIES if properties is None else properties
        indices = np.arange(n_images)
    else:
        root = Path(dataset).expanduser()
        if (root / "metadata.csv").is_file():
            data = WaterbirdsDataset(root, bundle.preprocess, split="all", progress=False)
            available = {"bird": ("y", data.class_names), "place": ("place", data.place_names)}
        else:
            data = ImageFolderDataset(root, bundle.preprocess, progress=False)
            available = {"class": ("label", data.classes)}
        if n_images > len(data):
            raise ValueError(f"{root} holds {len(data)} readable images, fewer than n_images={n_images}.")
        indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_images].numpy()
    properties = list(available) if properties is None else list(properties)
    unknown = [p for p in properties if p not in available]
    if unknown or not properties:
        raise ValueError(f"Unknown properties {unknown} for {dataset}; choose among {list(available)}.")
    return PropertyImages(
        data,
        indices,
        {p: np.asarray(data.labels[available[p][0]])[indices] for p in properties},
        {p: list(available[p][1]) for p in properties},
    )


@dataclass
class RetrievalEvaluation:
    """Chapter 4's experiment: property heads chosen on one half of the images, measured on the other.

    Attributes:
        images: the images and their properties.
        heads: [n, L', H, d'] every head's direct terms; ``embeddings``: [n, d'] the full embeddings.
        head_layers: the model layer of each row of ``heads``.
        choose, measure: disjoint positions (halves) to choose heads on and to measure them on.
        k: neighbours per query.
        scores: ground-truth scores of every head on the ``choose`` half.
        agreement: property -> [L', H] neighbour agreement of each head on the ``choose`` half.
        chosen: property -> (layer, head) with the highest ground-truth score.
        best_retrieval: property -> (layer, head) with the highest agreement on the ``choose`` half.
    """

    images: PropertyImages
    heads: torch.Tensor
    embeddings: torch.Tensor
    head_layers: tuple[int, ...]
    choose: torch.Tensor
    measure: torch.Tensor
    k: int
    scores: groundtruth.HeadScores
    agreement: dict[str, torch.Tensor] = field(repr=False)
    chosen: dict[str, tuple[int, int]]
    best_retrieval: dict[str, tuple[int, int]]

    @property
    def properties(self) -> list[str]:
        return self.images.properties

    def head(self, layer: int, head: int) -> torch.Tensor:
        """[n, d'] the direct terms of head ``(layer, head)`` for every image."""
        if layer not in self.head_layers or not 0 <= head < self.heads.shape[2]:
            raise KeyError(
                f"No head L{layer}H{head}: layers {self.head_layers}, heads 0..{self.heads.shape[2] - 1}."
            )
        return self.heads[:, self.head_layers.index(layer), head]

    def similarities(self) -> dict[str, torch.Tensor]:
        """Row name -> [n, d'] terms whose dot products rank neighbours: each chosen head, then the full
        embedding."""
        rows = {f"{p} head L{l}H{h}": self.head(l, h) for p, (l, h) in self.chosen.items()}
        return {**rows, "full embedding": self.embeddings}

    def agreements(self, terms: torch.Tensor) -> dict[str, float]:
        """Property -> mean agreement@k (fraction) of [n, d'] ``terms`` on the ``measure`` half."""
        return {
            p: neighbour_agreement(terms[self.measure], values[self.measure.numpy()], self.k).mean().item()
            for p, values in self.images.labels.items()
        }

    def table(self) -> "pd.DataFrame":  # noqa: F821 (pandas is imported lazily)
        """Agreement@k (fractions) on the ``measure`` half: one row per similarity plus ``"chance"``."""
        import pandas as pd

        table = pd.DataFrame({name: self.agreements(terms) for name, terms in self.similarities().items()}).T
        table.loc["chance"] = [
            chance_agreement(values[self.measure.numpy()]) for values in self.images.labels.values()
        ]
        return table

    def summary(self) -> "pd.DataFrame":  # noqa: F821
        """Per property: the chosen head, its agreement on its own property, the full embedding's, chance,
        and the head's mean agreement on the other properties (fractions)."""
        import pandas as pd

        table, rows = self.table(), {}
        for p, (layer, head) in self.chosen.items():
            name = f"{p} head L{layer}H{head}"
            others = [q for q in self.properties if q != p]
            rows[p] = {
                "head": f"L{layer}H{head}",
                "own": table.loc[name, p],
                "full": table.loc["full embedding", p],
                "chance": table.loc["chance", p],
                "others": table.loc[name, others].mean() if others else float("nan"),
            }
        return pd.DataFrame(rows).T

    def picks(self) -> "pd.DataFrame":  # noqa: F821
        """Per property: the ground-truth head, the best-retrieval head, and whether they agree (✓/✗)."""
        import pandas as pd

        return pd.DataFrame(
            {
                p: {
                    "ground-truth head": f"L{self.chosen[p][0]}H{self.chosen[p][1]}",
                    "best retrieval head": f"L{self.best_retrieval[p][0]}H{self.best_retrieval[p][1]}",
                    "same head": "✓" if self.chosen[p] == self.best_retrieval[p] else "✗",
                }
                for p in self.properties
            }
        ).T

    def neighbours(self, query: int, n: int) -> dict[str, list[int]]:
        """Row name -> positions of the ``n`` nearest neighbours of position ``query`` within the
        ``measure`` half."""
        pool = self.measure.tolist()
        if query not in pool:
            raise ValueError(f"query {query} is not in the measure half; pick one of evaluation.measure.")
        return {
            name: [pool[j] for j in nearest(terms[self.measure], pool.index(query), k=n).tolist()]
            for name, terms in self.similarities().items()
        }


def evaluate(
    bundle: ClipBundle,
    dataset: str | Path | PropertyImages = "toy",
    n_images: int = 600,
    *,
    k: int = 8,
    properties: Sequence[str] | None = None,
    seed: int = 4040,
    split_seed: int = 0,
    batch_size: int = 64,
) -> RetrievalEvaluation:
    """Decompose images with known properties, choose a head per property, and score retrieval.

    Args:
        bundle: the model.
        dataset: ``"toy"``, a Waterbirds or image folder (see :func:`property_images`), or prepared images.
        n_images: how many images (ignored for prepared images).
        k: neighbours per query (lowered to fit the halves if needed).
        properties: which properties (default: see :func:`property_images`).
        seed: which images (see :func:`property_images`).
        split_seed: seed of the random split into the ``choose`` and ``measure`` halves.
        batch_size: images per decomposition pass.
    """
    images = (
        dataset
        if isinstance(dataset, PropertyImages)
        else property_images(bundle, dataset, n_images, seed=seed, properties=properties)
    )
    parts = decompose_batches(bundle, images.images(), batch_size=batch_size, progress=False)
    heads, n = parts.head_terms(), len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    choose, measure = order[: n // 2], order[n // 2 :]
    k = min(k, len(choose) - 1, len(measure) - 1)
    half = {p: values[choose.numpy()] for p, values in images.labels.items()}
    scores = groundtruth.head_scores(heads[choose], half, parts.head_layers, names=images.properties)
    agreement = {p: agreement_by_head(heads[choose], values, k) for p, values in half.items()}
    chosen, best = {}, {}
    for p in images.properties:
        layer, head, _ = scores.best(p, 1)[0]
        chosen[p] = (layer, head)
        row, head = divmod(int(agreement[p].argmax()), parts.n_heads)
        best[p] = (parts.head_layers[row], head)
    return RetrievalEvaluation(
        images, heads, parts.total(), parts.head_layers, choose, measure, k, scores, agreement, chosen, best
    )
