"""Zero-shot classification: class embeddings from prompts, the toy world's tasks, and accuracy.

A zero-shot classifier is one embedding per class: the normalised mean of the normalised text
embeddings of the class's prompts (open_clip's ``build_zero_shot_classifier``). An image gets the
class whose embedding is most similar to its own. Every accuracy here is a fraction in [0, 1];
format it as a percentage only for display.

The toy world's "ImageNet" is a set of attribute tasks (:data:`TOY_TASKS`), each a zero-shot
classification over the attribute's values with the world's prompt templates, scored on the
``"uniform"`` split (independent attributes); its spurious task ("round" vs "angular") is scored on
the balanced ``"test_groups"`` split, per group. The 1000 ImageNet class names and the 80 OpenAI
prompt templates are open_clip's own (``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``).

Example:
    >>> bundle = clipdecomp.load("toy")
    >>> classifiers = toy_classifiers(bundle)             # {"shape": [64, 6], "colour": [64, 6], ...}
    >>> sorted(classifiers) == sorted(TOY_TASKS)
    True
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from .loading import ClipBundle
from .progress import progress_shown
from .toy import world

__all__ = [
    "IMAGENET_CLASSNAMES",
    "OPENAI_IMAGENET_TEMPLATES",
    "TOY_TASKS",
    "accuracy",
    "class_embeddings",
    "group_accuracy",
    "task_accuracies",
    "toy_classifiers",
    "toy_zero_shot",
    "zero_shot_classifier",
]

TOY_TASKS = ("shape", "colour", "position", "size", "background")
"""The toy world's ordinary attribute tasks; ``"label"`` (round vs angular) is its spurious task."""

Template = str | Callable[[str], str]


def class_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """[d', C] classifier of an open_clip model and tokenizer (see :func:`zero_shot_classifier`)."""
    if not classnames:
        raise ValueError("A zero-shot classifier needs at least one class name.")
    if not templates:
        raise ValueError("A zero-shot classifier needs at least one prompt template.")
    bad = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if bad:
        raise ValueError(
            f"Templates must contain '{{}}' where the class name goes, e.g. 'a photo of a {{}}.'; "
            f"got {bad[:3]}."
        )
    as_callables = [t.format if isinstance(t, str) else t for t in templates]  # open_clip wants one kind
    weights = open_clip.build_zero_shot_classifier(
        model,
        tokenizer,
        list(classnames),
        as_callables,
        num_classes_per_batch=10,
        device=device,
        use_tqdm=progress_shown(progress),
    )
    return weights.float()


def zero_shot_classifier(
    bundle: ClipBundle,
    classnames: Sequence[str],
    templates: Sequence[Template] = OPENAI_IMAGENET_TEMPLATES,
    progress: bool = False,
) -> torch.Tensor:
    """[d', C] classifier: per class, the normalised mean of its normalised prompt embeddings.

    ``templates`` are format strings with one ``{}`` or callables ``name -> prompt``.
    Score images with ``embeddings @ classifier`` (embeddings L2-normalised).
    """
    return class_embeddings(bundle.model, bundle.tokenizer, classnames, templates, bundle.device, progress)


def toy_classifiers(bundle: ClipBundle, tasks: Sequence[str] = TOY_TASKS) -> dict[str, torch.Tensor]:
    """Per toy-world task, the [d', values] classifier built from the world's prompt templates."""
    return {
        task: zero_shot_classifier(bundle, world.ATTRIBUTES[task], world.prompt_templates(task))
        for task in tasks
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy (a fraction in [0, 1]) of [n, C] scores against [n] integer labels."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of scores but {labels.shape[0]} labels.")
    top = logits.topk(k, dim=-1).indices
    return (top == labels.to(top.device)[:, None]).any(-1).float().mean().item()


def task_accuracies(
    embeddings: torch.Tensor,
    classifiers: Mapping[str, torch.Tensor],
    labels: Mapping[str, np.ndarray | torch.Tensor],
) -> dict[str, float]:
    """Zero-shot accuracy (fraction) of [n, d'] image embeddings on each task (argmax ignores norms)."""
    return {
        task: accuracy(embeddings @ weights.to(embeddings), torch.as_tensor(np.asarray(labels[task])))
        for task, weights in classifiers.items()
    }


def group_accuracy(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[int, float]:
    """Accuracy (fraction) of [n] predictions within each group id present in ``groups``."""
    correct = (predictions.cpu() == labels.cpu()).float()
    return {int(g): correct[groups.cpu() == g].mean().item() for g in groups.unique().tolist()}


@torch.no_grad()
def _toy_features(
    model: torch.nn.Module, images: np.ndarray, preprocess: Callable | None, batch_size: int = 500
) -> torch.Tensor:
    from PIL import Image

    chunks = []
    for start in range(0, len(images), batch_size):
        part = images[start : start + batch_size]
        x = (
            world.to_tensor(part)
            if preprocess is None
            else torch.stack([preprocess(Image.fromarray(img)) for img in part])
        )
        chunks.append(F.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(chunks)


def toy_zero_shot(
    model: torch.nn.Module,
    tokenizer: Callable,
    preprocess: Callable | None = None,
    n: int = 2000,
    seed: int = 1000,
) -> dict[str, float | dict[str, float]]:
    """The model card's held-out zero-shot accuracies (fractions) on ``n`` fresh samples per split.

    Args:
        model: an open_clip CLIP (evaluated in eval mode, its mode restored afterwards).
        tokenizer: open_clip tokenizer.
        preprocess: open_clip's PIL transform, or ``None`` for the equivalent fast ``world.to_tensor``.
        n: samples per split.
        seed: held-out seed (the evaluation splits never share images with training).

    Returns:
        ``{task: acc}`` for :data:`TOY_TASKS`, plus ``spurious`` (mean over the four groups),
        ``spurious_worst`` and ``spurious_groups`` (``{group name: acc}``).
    """
    was_training = model.training
    model.eval()
    classifiers = {
        task: class_embeddings(model, tokenizer, world.ATTRIBUTES[task], world.prompt_templates(task))
        for task in (*TOY_TASKS, "label")
    }
    uniform = world.sample(n, seed, split="uniform")
    result: dict[str, float | dict[str, float]] = task_accuracies(
        _toy_features(model, uniform.images, preprocess),
        {t: classifiers[t] for t in TOY_TASKS},
        uniform.attributes,
    )
    groups = world.spurious_split(n, seed)
    pred = (_toy_features(model, groups.images, preprocess) @ classifiers["label"]).argmax(1)
    label = torch.as_tensor(groups.attributes["label"])
    per_group = group_accuracy(pred, label, 2 * label + torch.as_tensor(groups.attributes["place"]))
    named = {name: per_group[g] for g, name in enumerate(world.group_names())}
    result["spurious"] = float(np.mean(list(named.values())))
    result["spurious_worst"] = min(named.values())
    result["spurious_groups"] = named
    model.train(was_training)
    return result
