"""Glue between the toy world and the library: preprocessing samples, per-attribute zero-shot tasks.

The toy world's "ImageNet" is a set of attribute tasks (shape, colour, position, size, background),
each a zero-shot classification over the attribute's values with the world's prompt templates.
Because every image's attributes and object mask are known, the applications can be scored exactly:
retrieval by the share of neighbours with the query's value (chapter 4), heatmaps by whether their
hottest pixel lies on the object (chapter 5), head scores against a random-init twin of the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from .decomposition import Decomposition
from .loading import ClipBundle, toy_model_dir
from .toy import ATTRIBUTES, ToySamples, prompt_templates
from .zero_shot import accuracy, zero_shot_classifier

__all__ = ["TASKS", "preprocess_samples", "attribute_classifiers", "attribute_accuracies",
           "neighbour_agreement", "agreement_by_head", "chance_agreement", "pointing_game", "random_twin",
           "cue_and_label_signal"]

TASKS = ("shape", "colour", "position", "size", "background")
"""The ordinary attribute tasks; ``"label"`` (round vs angular) is the spurious task of chapter 6."""


def preprocess_samples(bundle: ClipBundle, samples: ToySamples) -> torch.Tensor:
    """[n, 3, H, W] model inputs from the samples' uint8 images, through the bundle's own preprocess."""
    return torch.stack([bundle.preprocess(Image.fromarray(image)) for image in samples.images])


def attribute_classifiers(bundle: ClipBundle, tasks: Sequence[str] = TASKS) -> dict[str, torch.Tensor]:
    """Per task, the [d', values] zero-shot classifier built from the toy world's prompt templates.

    The prompts are the ones :func:`clipdecomp.toy.zeroshot.evaluate` scores the model card with.
    """
    return {task: zero_shot_classifier(bundle, ATTRIBUTES[task], prompt_templates(task)) for task in tasks}


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
    if n < 2:
        raise ValueError(f"chance_agreement needs at least 2 images, got {n}.")
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def pointing_game(heat: torch.Tensor, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[B] bool: does the hottest pixel of each map ([B, H, W]) fall inside the object mask ([B, H, W])?"""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if heat.shape != masks.shape:
        raise ValueError(f"heat maps {tuple(heat.shape)} and masks {tuple(masks.shape)} differ in shape: "
                         "upsample the maps to the image size first (clipdecomp.spatial.heatmap(..., size=64)).")
    hottest = heat.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, hottest[:, None])[:, 0]


def random_twin(spec: str, seed: int = 0) -> open_clip.model.CLIP:
    """A random-init CLIP with the architecture of a local model (``"toy"`` or an open_clip local-dir folder).

    The baseline of :func:`clipdecomp.toy.groundtruth.versus_baseline`: scores that a random network of
    the same shape already reaches are not evidence of what training put into a head.
    """
    folder = toy_model_dir() if spec == "toy" else Path(spec).expanduser()
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"No open_clip_config.json in {folder}: random_twin needs 'toy' or a local-dir "
                                "model folder (open_clip_config.json + weights).")
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**json.loads(config.read_text())["model_cfg"]).eval()


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = (x.norm() * y.norm()).item()
    return float((x @ y).item() / scale) if scale > 0 else 0.0


def cue_and_label_signal(parts: Decomposition, direction: torch.Tensor, label: torch.Tensor,
                         cue: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """What each component's share of a logit difference tracks: the spurious cue, or the label.

    For every part of ``parts.stack("head")`` (labels ``"embed"``, ``"L3H1"``, ``"mlp_2"``, ...), its
    score is ``term @ direction`` (e.g. ``direction = classifier[:, 1] - classifier[:, 0]``). Returns the
    labels, the correlation of each score with ``cue`` ([n] 0/1), and its correlation with ``label``
    *within* each cue value (averaged over the cue values). Ablating components can only help the
    worst group if some remaining component has a label correlation within the cue.
    """
    terms, labels = parts.stack("head")
    scores = terms.float() @ direction.float().to(terms.device)
    cue, label = torch.as_tensor(cue), torch.as_tensor(label)
    with_cue = torch.tensor([_correlation(scores[:, k], cue) for k in range(len(labels))])
    within = torch.tensor([np.mean([_correlation(scores[cue == v, k], label[cue == v]) for v in cue.unique()])
                           for k in range(len(labels))])
    return labels, with_cue, within
