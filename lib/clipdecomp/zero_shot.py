"""Zero-shot classification: prompt-ensembled class embeddings and accuracy helpers.

The 1000 ImageNet class names and the 80 OpenAI prompt templates are open_clip's own
(``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``), re-exported here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from .loading import ClipBundle

__all__ = ["zero_shot_classifier", "accuracy", "group_accuracy", "IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES"]


def zero_shot_classifier(bundle: ClipBundle, classnames: Sequence[str],
                         templates: Sequence[str | Callable[[str], str]] = OPENAI_IMAGENET_TEMPLATES,
                         progress: bool = False) -> torch.Tensor:
    """[d', C] classifier: per class, the normalised mean of its normalised prompt embeddings.

    ``templates`` are format strings with one ``{}`` or callables ``name -> prompt``.
    Score images with ``embeddings @ classifier`` (embeddings L2-normalised).
    """
    if not classnames:
        raise ValueError("zero_shot_classifier needs at least one class name.")
    if not templates:
        raise ValueError("zero_shot_classifier needs at least one prompt template.")
    bad = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if bad:
        raise ValueError(f"Templates must contain '{{}}' where the class name goes, e.g. 'a photo of a {{}}.'; got {bad[:3]}.")
    as_callables = [t.format if isinstance(t, str) else t for t in templates]  # open_clip wants one kind
    weights = open_clip.build_zero_shot_classifier(
        bundle.model, bundle.tokenizer, list(classnames), as_callables, num_classes_per_batch=10,
        device=bundle.device, use_tqdm=progress)
    return weights.float()


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy (a fraction in [0, 1]) of [n, C] scores against [n] integer labels."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of scores but {labels.shape[0]} labels.")
    top = logits.topk(k, dim=-1).indices
    return (top == labels.to(top.device)[:, None]).any(-1).float().mean().item()


def group_accuracy(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[int, float]:
    """Accuracy of [n] predictions within each group id present in ``groups``."""
    correct = (predictions.cpu() == labels.cpu()).float()
    return {int(g): correct[groups.cpu() == g].mean().item() for g in groups.unique().tolist()}
