"""Zero-shot evaluation of a CLIP on held-out toy-world samples.

Each attribute is a zero-shot classification task: the class embedding is the normalised mean of the
text embeddings of the class's prompts (``world.class_prompts``), and an image gets the class whose
embedding is most similar to its own. The ordinary attributes are measured on ``split="uniform"``
(independent attributes); the spurious task ("round" vs "angular") on the balanced
``split="test_groups"``, reported as the mean over the four groups, each group and the worst group.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import world

__all__ = ["MEAN", "STD", "EVAL_ATTRIBUTES", "to_tensor", "evaluate"]

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
EVAL_ATTRIBUTES = ("colour", "background", "shape", "position", "size")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> normalised float [n, 3, H, W], equal to open_clip's preprocess at 64 px."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@torch.no_grad()
def _image_features(model: torch.nn.Module, images: np.ndarray, preprocess: Callable | None,
                    batch_size: int = 500) -> torch.Tensor:
    chunks = []
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        if preprocess is None:
            x = to_tensor(part)
        else:
            x = torch.stack([preprocess(Image.fromarray(img)) for img in part])
        chunks.append(F.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(chunks)


@torch.no_grad()
def class_embeddings(model: torch.nn.Module, tokenizer: Callable, attribute: str) -> torch.Tensor:
    """[n_classes, d]: normalised mean prompt embedding of each class of ``attribute``."""
    prompts = world.class_prompts(attribute)
    flat = [p for group in prompts for p in group]
    emb = F.normalize(model.encode_text(tokenizer(flat)).float(), dim=-1)
    emb = emb.view(len(prompts), len(prompts[0]), -1).mean(1)
    return F.normalize(emb, dim=-1)


def evaluate(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable | None = None,
             n: int = 2000, seed: int = 1000) -> dict[str, float | dict[str, float]]:
    """Zero-shot accuracies (in %) on ``n`` fresh samples of each evaluation split.

    Args:
        model: an open_clip CLIP (put in eval mode by the caller).
        tokenizer: open_clip tokenizer.
        preprocess: open_clip's PIL transform, or ``None`` for the equivalent fast ``to_tensor``.
        n: samples per split.
        seed: held-out seed (the evaluation splits never share images with training).

    Returns:
        ``{attribute: acc}`` for ``EVAL_ATTRIBUTES``, plus ``spurious`` (mean over groups),
        ``spurious_worst`` and ``spurious_groups`` (``{group name: acc}``).
    """
    was_training = model.training
    model.eval()
    uniform = world.sample(n, seed, split="uniform")
    feats = _image_features(model, uniform.images, preprocess)
    result: dict[str, float | dict[str, float]] = {}
    for attribute in EVAL_ATTRIBUTES:
        pred = (feats @ class_embeddings(model, tokenizer, attribute).T).argmax(1).numpy()
        result[attribute] = round(100 * float(np.mean(pred == uniform.attributes[attribute])), 2)
    groups = world.spurious_split(n, seed)
    feats = _image_features(model, groups.images, preprocess)
    pred = (feats @ class_embeddings(model, tokenizer, "label").T).argmax(1).numpy()
    correct = pred == groups.attributes["label"]
    group_id = 2 * groups.attributes["label"] + groups.attributes["place"]
    per_group = {name: round(100 * float(correct[group_id == g].mean()), 2)
                 for g, name in enumerate(world.group_names())}
    result["spurious"] = round(float(np.mean(list(per_group.values()))), 2)
    result["spurious_worst"] = min(per_group.values())
    result["spurious_groups"] = per_group
    model.train(was_training)
    return result
