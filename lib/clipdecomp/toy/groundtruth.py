"""Ground truth for the toy world: how much of each attention head's output an attribute explains.

For one head, collect its direct contributions ``c_i`` (one d'-vector per image) and group the images
by an attribute's value. The score is the *between-class share of variance*

    R^2 = sum_k n_k ||mean_k - mean||^2 / sum_i ||c_i - mean||^2,

0 when the attribute tells nothing about where the head writes, 1 when the head's output is a
function of the attribute alone. It is the multi-output R^2 of regressing the contributions on the
attribute's one-hot code.

A raw R^2 proves little: even an untrained network is a fixed function of its pixels, and an attribute
that covers most of the image (the background) explains nearly all the variance of every head of a
random-init model. Compare against the same score on a random-init model of the same architecture
(:func:`versus_baseline`), whose difference isolates what training put into the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["HeadScores", "variance_explained", "head_scores", "versus_baseline"]


@dataclass
class HeadScores:
    """Scores of every head for several attributes.

    Attributes:
        scores: float [layers, heads, attributes].
        attributes: the attribute names, in the order of the last axis.
    """

    scores: np.ndarray
    attributes: list[str]

    def __getitem__(self, attribute: str) -> np.ndarray:
        """The [layers, heads] table of one attribute."""
        return self.scores[..., self.attributes.index(attribute)]

    def best(self, attribute: str, k: int = 3) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring (layer, head, score) for ``attribute``."""
        table = self[attribute]
        order = np.argsort(table, axis=None)[::-1][:k]
        return [(int(i // table.shape[1]), int(i % table.shape[1]), float(table.flat[i])) for i in order]


def variance_explained(contributions: torch.Tensor, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Between-class share of variance, per head.

    Args:
        contributions: [n, ..., d] direct contributions (e.g. [n, layers, heads, d]).
        labels: int [n], the class of each image.

    Returns:
        [...] (e.g. [layers, heads]) scores in [0, 1]; 0 for a head whose output never varies.
    """
    x = contributions.double()
    labels = torch.as_tensor(np.asarray(labels)).long()
    centred = x - x.mean(0, keepdim=True)
    total = centred.pow(2).sum(dim=(0, -1))
    between = torch.zeros_like(total)
    for k in labels.unique():
        members = centred[labels == k]
        between += len(members) * members.mean(0).pow(2).sum(-1)
    return torch.where(total > 0, between / total.clamp_min(1e-300), torch.zeros_like(total)).float()


def head_scores(contributions: torch.Tensor, attributes: Mapping[str, np.ndarray],
                names: Sequence[str] | None = None) -> HeadScores:
    """Score every head of ``contributions`` [n, layers, heads, d] for each attribute.

    Args:
        contributions: per-head direct contributions, e.g. ``clipdecomp.decompose(model, x).heads``.
        attributes: ``ToySamples.attributes`` of the same images (name -> int array [n]).
        names: which attributes to score (default: all of them).
    """
    names = list(names or attributes)
    table = torch.stack([variance_explained(contributions, attributes[a]) for a in names], dim=-1)
    return HeadScores(table.numpy(), names)


def versus_baseline(trained: HeadScores, baseline: HeadScores) -> HeadScores:
    """Trained minus random-init scores (same architecture, same images): what training added."""
    if trained.attributes != baseline.attributes or trained.scores.shape != baseline.scores.shape:
        raise ValueError("trained and baseline scores must cover the same heads and attributes")
    return HeadScores(trained.scores - baseline.scores, list(trained.attributes))
