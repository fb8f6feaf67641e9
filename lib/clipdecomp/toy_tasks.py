"""Glue between the toy world and the library: preprocessing samples, per-attribute zero-shot tasks.

The toy world's "ImageNet" is a set of attribute tasks (shape, colour, position, size, background),
each a zero-shot classification over the attribute's values with the world's prompt templates.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import torch
from PIL import Image

from .loading import ClipBundle
from .toy import ATTRIBUTES, PROMPTS, ToySamples
from .zero_shot import accuracy, zero_shot_classifier

__all__ = ["TASKS", "preprocess_samples", "attribute_classifiers", "attribute_accuracies",
           "neighbour_agreement", "agreement_by_head", "chance_agreement", "pointing_game"]

TASKS = ("shape", "colour", "position", "size", "background")
"""The ordinary attribute tasks; ``"label"`` (round vs angular) is the spurious task of chapter 6."""


def preprocess_samples(bundle: ClipBundle, samples: ToySamples) -> torch.Tensor:
    """[n, 3, H, W] model inputs from the samples' uint8 images, through the bundle's own preprocess."""
    return torch.stack([bundle.preprocess(Image.fromarray(image)) for image in samples.images])


def attribute_classifiers(bundle: ClipBundle, tasks: Sequence[str] = TASKS) -> dict[str, torch.Tensor]:
    """Per task, the [d', values] zero-shot classifier built from the toy world's prompt templates."""
    return {task: zero_shot_classifier(bundle, ATTRIBUTES[task], PROMPTS[task]) for task in tasks}


def attribute_accuracies(embeddings: torch.Tensor, classifiers: dict[str, torch.Tensor],
                         samples: ToySamples) -> dict[str, float]:
    """Zero-shot accuracy of [n, d'] image embeddings on each task (argmax is norm-invariant)."""
    return {task: accuracy(embeddings @ weights.to(embeddings), torch.as_tensor(samples.attributes[task]))
            for task, weights in classifiers.items()}


def neighbour_agreement(terms: torch.Tensor, values: torch.Tensor | np.ndarray, k: int = 8) -> torch.Tensor:
    """[n] for each image, the fraction of its ``k`` nearest neighbours that share its attribute value.

    Neighbours are ranked by the dot product of ``terms`` ([n, d'], e.g. one head's direct terms, as in
    :func:`clipdecomp.retrieval.nearest`); an image is never its own neighbour.
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


def agreement_by_head(head_terms: torch.Tensor, values: torch.Tensor | np.ndarray, k: int = 8) -> torch.Tensor:
    """[L', H] mean :func:`neighbour_agreement` of each head's terms ([n, L', H, d'])."""
    return torch.tensor([[neighbour_agreement(head_terms[:, layer, head], values, k).mean().item()
                          for head in range(head_terms.shape[2])] for layer in range(head_terms.shape[1])])


def chance_agreement(values: torch.Tensor | np.ndarray) -> float:
    """Expected :func:`neighbour_agreement` of neighbours drawn at random from the other images."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def pointing_game(heat: torch.Tensor, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[B] bool: does the hottest pixel of each map ([B, H, W]) fall inside the object mask ([B, H, W])?"""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if heat.shape != masks.shape:
        raise ValueError(f"heat maps {tuple(heat.shape)} and masks {tuple(masks.shape)} differ in shape: "
                         "upsample the maps to the image size first (clipdecomp.spatial.heatmap(..., size=64)).")
    hottest = heat.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, hottest[:, None])[:, 0]
