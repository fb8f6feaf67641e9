"""Spatial maps: where in the image a text direction is written into the embedding.

From a spatial decomposition, each (layer, token, head) term dotted with a text embedding says how
much that image patch, through that head, moves the embedding towards the text. Summing over the
selected heads and dropping the CLS token gives a patch-grid map; bilinear upsampling gives a
heatmap at image resolution.

:func:`class_contrasts` prepares chapter 5's experiment: images with object masks (the toy world,
or the real photos of ImageNet-segmentation), their spatial decomposition, and *class contrasts*:
per family of texts (colour, shape, background; or the predicted class), one direction per class,
its class embedding minus the mean over the family's classes ("red rather than any colour").
:meth:`ContrastSet.pointing_game` then scores the maps against the masks.

Example:
    >>> import clipdecomp
    >>> study = class_contrasts(clipdecomp.load("toy"), "toy", n_images=8)
    >>> list(study.pointing_game().columns)          # per contrast, fractions
    ['hit rate', 'chance', 'a hit means']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import toy
from .components import parse_label
from .decomposition import Decomposition, decompose_batches
from .imagenet_seg import ImageNetSegmentation, align_mask
from .loading import ClipBundle
from .zero_shot import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, toy_classifiers, zero_shot_classifier

__all__ = [
    "patch_scores",
    "heatmap",
    "contrastive_heatmap",
    "joint_map",
    "joint_maps",
    "strongest_head",
    "pointing_game",
    "Contrast",
    "ContrastSet",
    "class_contrasts",
    "TOY_CONTRASTS",
]

TOY_CONTRASTS = {"colour": True, "shape": True, "background": False}
"""Toy attribute -> where its map should peak: on the object (True) or off it (False)."""


def _select(parts: Decomposition, heads: Sequence[tuple[int, int] | str] | None) -> torch.Tensor:
    """[B, N, d'] per-token terms summed over ``heads`` ((layer, head) pairs or labels such as "L4H2";
    default: every head with spatial detail)."""
    if not parts.spatial:
        raise ValueError("Spatial maps need decompose(..., spatial=True).")
    if heads is None:
        return parts.heads.sum((1, 3))
    heads = [_head_pair(parts, head) for head in heads]
    missing = sorted({l for l, _ in heads if l not in parts.head_layers})
    if missing:
        raise ValueError(
            f"Layers {missing} have no spatial detail; decompose with layers including them "
            f"(have {parts.head_layers})."
        )
    return sum(parts.heads[:, parts.head_layers.index(l), :, h] for l, h in heads)


def _head_pair(parts: Decomposition, head: tuple[int, int] | str) -> tuple[int, int]:
    """A (layer, head) pair from a pair or a head label, checked against the decomposition."""
    label = head if isinstance(head, str) else f"L{head[0]}H{head[1]}"
    component = parse_label(label, parts.n_layers, parts.n_heads)
    if component.kind != "head":
        raise ValueError(f"{label}: spatial maps sum whole heads; name a head such as 'L4H2'.")
    return component.layer, component.head


def _along(terms: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``terms`` [B, ..., d'] dotted with one direction [d'] or one per image [B, d'] -> [B, ...]."""
    direction = direction.to(terms)
    if direction.ndim == 1:
        return terms @ direction
    if direction.ndim != 2 or direction.shape[0] != terms.shape[0]:
        raise ValueError(
            f"direction must be [d'] or one per image [{terms.shape[0]}, d'], got {tuple(direction.shape)}."
        )
    return torch.einsum("b...d,bd->b...", terms, direction)


def patch_scores(
    parts: Decomposition, direction: torch.Tensor, heads: Sequence[tuple[int, int]] | None = None
) -> torch.Tensor:
    """[B, rows, cols] contribution of each image patch along ``direction``: [d'] (e.g. a text embedding)
    or [B, d'] (one per image)."""
    tokens = _along(_select(parts, heads), direction)
    rows, cols = parts.grid_size
    return tokens[:, 1:].reshape(-1, rows, cols)  # token 0 (CLS) has no place in the image


def heatmap(
    parts: Decomposition,
    direction: torch.Tensor,
    size: tuple[int, int] | int,
    heads: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """[B, H, W] patch scores upsampled bilinearly to the image size (positive: towards the text)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = patch_scores(parts, direction, heads)[:, None]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]


def contrastive_heatmap(
    parts: Decomposition,
    text_a: torch.Tensor,
    text_b: torch.Tensor,
    size: tuple[int, int] | int,
    heads: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Heatmap along ``text_a - text_b``: where the image speaks for A rather than B."""
    return heatmap(parts, text_a - text_b, size, heads)


def joint_map(parts: Decomposition, layer: int, head: int, direction: torch.Tensor) -> torch.Tensor:
    """[B, rows, cols] one head's patch map along one direction (e.g. one of its TEXT SPAN texts)."""
    return patch_scores(parts, direction, heads=[(layer, head)])


def joint_maps(parts: Decomposition, direction: torch.Tensor) -> torch.Tensor:
    """[B, L', H, rows, cols] every head's patch map along ``direction`` ([d'] or [B, d'])."""
    if not parts.spatial:
        raise ValueError("Spatial maps need decompose(..., spatial=True).")
    scores = _along(parts.heads[:, :, 1:].transpose(2, 3), direction)  # [B, L', H, patches]
    return scores.reshape(*scores.shape[:3], *parts.grid_size)


def strongest_head(maps: torch.Tensor, layers: Sequence[int]) -> tuple[tuple[int, int], float]:
    """The (layer, head) whose map ([L', H, rows, cols], e.g. ``joint_maps(...)[i]``) sums highest, and
    its share of the positive sums over heads (of the layers ``layers``)."""
    strength = maps.sum((-2, -1))
    row, head = divmod(int(strength.argmax()), strength.shape[1])
    positive = strength.clamp_min(0).sum().item()
    return (layers[row], head), (strength.max().item() / positive if positive > 0 else 0.0)


def pointing_game(heat: torch.Tensor, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[B] bool: does the hottest pixel of each map ([B, H, W]) fall inside the object mask ([B, H, W])?"""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if heat.shape != masks.shape:
        raise ValueError(
            f"heat maps {tuple(heat.shape)} and masks {tuple(masks.shape)} differ in shape: "
            "upsample the maps to the image size first (clipdecomp.spatial.heatmap(..., size=64))."
        )
    hottest = heat.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, hottest[:, None])[:, 0]


@dataclass
class Contrast:
    """One family of texts to map, e.g. the toy colours: a class embedding per class and each image's class.

    Attributes:
        class_names: the classes, e.g. ``["red", "orange", ...]``.
        embeddings: [C, d'] the zero-shot class embeddings (rows).
        labels: [n] the class of each image (its own colour; its predicted class).
        on_object: where the map of an image's own class should peak: on the object (True), off it
            (False, e.g. a background), or not scored (None).
    """

    class_names: list[str]
    embeddings: torch.Tensor
    labels: torch.Tensor
    on_object: bool | None

    def directions(self, centred: bool = True) -> torch.Tensor:
        """[C, d'] per class: its embedding minus the mean over the classes (``centred=False``: as is)."""
        return self.embeddings - self.embeddings.mean(0, keepdim=True) if centred else self.embeddings

    def own(self, centred: bool = True) -> torch.Tensor:
        """[n, d'] each image's own class direction."""
        return self.directions(centred)[self.labels]


@dataclass
class ContrastSet:
    """Images with masks, their spatial decomposition, and class contrasts: chapter 5's material.

    Attributes:
        name: ``"toy"`` or the file's name.
        images: [n, 3, H, W] preprocessed images (CPU); ``preprocess`` made them (for display).
        masks: bool [n, H, W] the object of each image, aligned with ``images``.
        parts: the spatial decomposition of ``images``.
        contrasts: family name -> :class:`Contrast` (toy: colour, shape, background).
        pairs: (A, B) family pairs for contrastive maps "A minus B".
    """

    name: str
    images: torch.Tensor
    masks: torch.Tensor
    parts: Decomposition
    contrasts: dict[str, Contrast]
    pairs: list[tuple[str, str]]
    preprocess: Callable

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def object_share(self) -> float:
        """The fraction of pixels that belong to an object: the hit rate of a map blind to the image."""
        return self.masks.float().mean().item()

    def texts(self, i: int, centred: bool = True) -> list[tuple[str, torch.Tensor]]:
        """(class name, direction) of image ``i``'s own class in every family, in family order."""
        return [(c.class_names[int(c.labels[i])], c.own(centred)[i]) for c in self.contrasts.values()]

    def heatmaps(
        self, family: str, centred: bool = True, heads: Sequence[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """[n, H, W] each image's map along its own class of ``family`` (over ``heads``, default all)."""
        if family not in self.contrasts:
            raise KeyError(f"No contrast {family!r}; have {list(self.contrasts)}.")
        return heatmap(self.parts, self.contrasts[family].own(centred), self.size, heads)

    def pointing_game(
        self, centred: bool = True, heads: Sequence[tuple[int, int]] | None = None
    ) -> "pd.DataFrame":  # noqa: F821
        """Per scored family: the hit rate of its maps (hottest pixel on the object, or off it for a
        background) and the chance rate of a map blind to the image (fractions)."""
        import pandas as pd

        rows = {}
        for family, contrast in self.contrasts.items():
            if contrast.on_object is None:
                continue
            hits = pointing_game(self.heatmaps(family, centred, heads), self.masks)
            on = contrast.on_object
            rows[family] = {
                "hit rate": (hits if on else ~hits).float().mean().item(),
                "chance": self.object_share if on else 1 - self.object_share,
                "a hit means": f"hottest pixel {'on' if on else 'off'} the object",
            }
        return pd.DataFrame(rows).T.astype({"hit rate": float, "chance": float})


def class_contrasts(
    bundle: ClipBundle,
    dataset: str | Path = "toy",
    n_images: int = 200,
    *,
    seed: int = 5050,
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence | None = None,
    mask_handling: str = "aligned",
) -> ContrastSet:
    """Images with masks, decomposed spatially, with their class contrasts.

    Args:
        bundle: the model.
        dataset: ``"toy"`` (uniform split; families colour, shape and background, each image's own
            value) or the path of ImageNet-segmentation's ``gtsegs_ijcv.mat`` (real photos; families
            the zero-shot ``"predicted class"``, scored on the object, and the ``"runner-up class"``).
        n_images: how many images (the first ones of the file).
        seed: toy sampling seed (never a training seed).
        batch_size: images per decomposition pass.
        layers: layers with spatial detail (default all; on large models the spatial decomposition
            takes layers x tokens x heads x d' floats per image: use few images or the last layers).
        class_names, templates: the real mode's zero-shot classes and prompts (default: ImageNet's
            1,000 classes and OpenAI's 80 templates).
        mask_handling: how ImageNet-segmentation masks follow the preprocess (see
            :mod:`clipdecomp.imagenet_seg`).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}.")
    if str(dataset) == "toy":
        samples = toy.sample(n_images, seed=seed, split="uniform")
        images = bundle.preprocess_batch(samples.images).cpu()
        masks = torch.stack([align_mask(mask, bundle.preprocess) for mask in samples.masks])
        classifiers = toy_classifiers(bundle, list(TOY_CONTRASTS))
        parts = decompose_batches(
            bundle, images, batch_size=batch_size, spatial=True, layers=layers, progress=False
        )
        contrasts = {
            a: Contrast(
                toy.ATTRIBUTES[a], classifiers[a].T.cpu(), torch.as_tensor(samples.attributes[a]), on_object
            )
            for a, on_object in TOY_CONTRASTS.items()
        }
        return ContrastSet(
            "toy",
            images,
            masks,
            parts,
            contrasts,
            [("colour", "background"), ("shape", "colour")],
            bundle.preprocess,
        )
    with ImageNetSegmentation(dataset, bundle.preprocess, mask_handling=mask_handling) as data:
        images, masks = data.batch(range(min(n_images, len(data))))
    names = list(class_names or IMAGENET_CLASSNAMES)
    classifier = zero_shot_classifier(bundle, names, templates or OPENAI_IMAGENET_TEMPLATES).cpu()
    parts = decompose_batches(
        bundle, images, batch_size=batch_size, spatial=True, layers=layers, progress=False
    )
    top = (parts.total() @ classifier).topk(min(2, len(names)), dim=1).indices
    families = {"predicted class": (top[:, 0], True), "runner-up class": (top[:, -1], None)}
    contrasts = {f: Contrast(names, classifier.T, labels, on) for f, (labels, on) in families.items()}
    return ContrastSet(
        Path(dataset).name,
        images,
        masks,
        parts,
        contrasts,
        [("predicted class", "runner-up class")],
        bundle.preprocess,
    )
