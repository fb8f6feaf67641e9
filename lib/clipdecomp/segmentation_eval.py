"""Chapter 7's experiment: a segmentation set and a harness that scores several map methods on it.

A *segmentation set* (:func:`segmentation_set`) is a stream of preprocessed images with their
ground-truth object masks aligned to them, a zero-shot classifier, and, where known, each image's
true class: the toy world (its 36 "colour shape" classes and exact masks) or ImageNet-segmentation's
``gtsegs_ijcv.mat`` (:mod:`clipdecomp.imagenet_seg`; ImageNet's 1,000 classes, no class labels).

:func:`compare` runs every method over the set in one pass and returns a :class:`Comparison`: the
Chefer et al. protocol's meters (:mod:`clipdecomp.seg_metrics`) per method plus a constant
"background everywhere" reference row, seconds per method, how many maps came out blank, the
meters split by whether the zero-shot prediction was right (where labels exist), and a gallery of
the first images' maps. A method is any function ``(model, images, classifier) -> [B, H, W] maps``:
the five of :data:`clipdecomp.segmentation.METHODS`, or one of your own.

Example:
    >>> import clipdecomp
    >>> bundle = clipdecomp.load("toy")
    >>> data = segmentation_set(bundle, "toy", n_images=8)
    >>> result = compare(["decomposition", "rollout"], bundle, data)
    >>> list(result.table().index)           # fractions; see Comparison.table
    ['decomposition', 'rollout', 'constant map (reference)']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import toy
from .imagenet_seg import HOW_TO_GET, ImageNetSegmentation, MaskHandling, align_mask
from .loading import ClipBundle
from .seg_metrics import SegmentationMeter
from .segmentation import METHODS, predict
from .zero_shot import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, zero_shot_classifier

__all__ = [
    "REFERENCE",
    "PUBLISHED_TABLE3",
    "Comparison",
    "Gallery",
    "SegmentationSet",
    "compare",
    "published_table",
    "segmentation_set",
]

REFERENCE = "constant map (reference)"
"""Name of the reference row: a map that predicts background everywhere."""

TOY_TEMPLATES = ("a photo of a {}.", "a {}.", "a {} shape.")
"""Prompts of the toy segmentation classes ("a red star")."""

Method = Callable[[ClipBundle, torch.Tensor, torch.Tensor], torch.Tensor]
"""A map method: (model, images [B, 3, H, W], classifier [d', C]) -> maps [B, H, W]."""

PUBLISHED_TABLE3 = {
    "LRP": (52.81, 33.57, 54.37),
    "partial-LRP": (61.49, 40.71, 72.29),
    "rollout": (60.63, 40.64, 74.47),
    "raw attention": (65.67, 43.83, 76.05),
    "GradCAM": (70.27, 44.50, 70.30),
    "Chefer et al.": (69.21, 47.47, 78.29),
    "decomposition (paper)": (75.21, 54.50, 81.61),
}
"""Gandelsman et al. (2024), Table 3, ViT-L-14 on ImageNet-segmentation: (pixel acc, mIoU, mAP) in %."""


def published_table() -> "pd.DataFrame":  # noqa: F821 (pandas is imported lazily)
    """:data:`PUBLISHED_TABLE3` as a table of fractions (columns "pixel acc", "mIoU", "mAP")."""
    import pandas as pd

    return pd.DataFrame(PUBLISHED_TABLE3, index=["pixel acc", "mIoU", "mAP"]).T / 100


@dataclass
class SegmentationSet:
    """Images with aligned object masks, a zero-shot classifier and (where known) the true classes.

    Attributes:
        name: ``"toy"`` or the file's name.
        class_names: the zero-shot classes.
        classifier: [d', C] their embeddings.
        labels: [n] each image's true class, or ``None`` (ImageNet-segmentation has none).
        masks_from: how the masks were made ("toy ground truth", or a ``mask_handling``).
        load: positions -> (images [b, 3, H, W], masks bool [b, H, W]).
        n_images: how many images the set holds.
    """

    name: str
    class_names: list[str]
    classifier: torch.Tensor
    labels: torch.Tensor | None
    masks_from: str
    load: Callable[[range], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    n_images: int

    def __len__(self) -> int:
        return self.n_images

    def batches(
        self, batch_size: int = 32
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(images, masks, labels or None) ``batch_size`` images at a time, in order."""
        for start in range(0, self.n_images, batch_size):
            positions = range(start, min(start + batch_size, self.n_images))
            images, masks = self.load(positions)
            yield images, masks, None if self.labels is None else self.labels[start : positions.stop]

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.n_images} images, {len(self.class_names)} classes, masks: {self.masks_from}"
        )


def segmentation_set(
    bundle: ClipBundle,
    dataset: str = "toy",
    *,
    path: str | Path | None = None,
    n_images: int | None = 200,
    mask_handling: MaskHandling = "aligned",
    seed: int = 7070,
    class_names: Sequence[str] | None = None,
    templates: Sequence | None = None,
) -> SegmentationSet:
    """The toy world or ImageNet-segmentation, prepared for the model.

    Args:
        bundle: the model; its preprocess prepares images and masks, its text tower the classifier.
        dataset: ``"toy"`` (uniform split; classes "colour shape", labels and exact masks) or
            ``"imagenet-seg"`` (the file at ``path``).
        path: ``gtsegs_ijcv.mat`` (``"imagenet-seg"`` only).
        n_images: how many images (``None``: the whole file; toy: 200).
        mask_handling: ``"aligned"`` or ``"authors"`` (see :mod:`clipdecomp.imagenet_seg`).
        seed: toy sampling seed (never a training seed).
        class_names, templates: zero-shot classes and prompts (default: the toy world's 36 objects;
            ImageNet's 1,000 classes with OpenAI's 80 templates).
    """
    if n_images is not None and n_images < 1:
        raise ValueError(f"n_images must be positive or None, got {n_images}.")
    if dataset == "toy":
        samples = toy.sample(n_images or 200, seed=seed, split="uniform")
        colours, shapes = toy.ATTRIBUTES["colour"], toy.ATTRIBUTES["shape"]
        names = list(class_names or [f"{colour} {shape}" for shape in shapes for colour in colours])
        images = bundle.preprocess_batch(samples.images).cpu()
        masks = torch.stack([align_mask(mask, bundle.preprocess) for mask in samples.masks])
        labels = torch.as_tensor(samples.attributes["shape"] * len(colours) + samples.attributes["colour"])
        classifier = zero_shot_classifier(bundle, names, templates or TOY_TEMPLATES)
        return SegmentationSet(
            "toy",
            names,
            classifier,
            labels,
            "toy ground truth",
            lambda positions: (
                images[positions.start : positions.stop],
                masks[positions.start : positions.stop],
            ),
            len(images),
        )
    if dataset != "imagenet-seg":
        raise ValueError(f"dataset must be 'toy' or 'imagenet-seg', got {dataset!r}.")
    if path is None:
        raise FileNotFoundError(
            f"dataset='imagenet-seg' needs path=... (seg_path in chapter 7). {HOW_TO_GET}"
        )
    data = ImageNetSegmentation(path, bundle.preprocess, mask_handling=mask_handling)
    names = list(class_names or IMAGENET_CLASSNAMES)
    classifier = zero_shot_classifier(bundle, names, templates or OPENAI_IMAGENET_TEMPLATES)
    total = len(data) if n_images is None else min(n_images, len(data))
    return SegmentationSet(Path(path).name, names, classifier, None, mask_handling, data.batch, total)


@dataclass
class Gallery:
    """The first images of a comparison: images [b, 3, H, W], masks [b, H, W], predicted classes [b],
    and each method's maps [b, H, W]."""

    images: torch.Tensor
    masks: torch.Tensor
    predicted: torch.Tensor
    maps: dict[str, torch.Tensor]


@dataclass
class Comparison:
    """What :func:`compare` measured; tables in fractions (format as % only for display).

    Attributes:
        methods: the method names, in table order.
        meters: method (and :data:`REFERENCE`) -> its :class:`~clipdecomp.seg_metrics.SegmentationMeter`.
        by_correctness: (method, right?) -> meter over the images whose prediction was right / wrong.
        seconds: method -> seconds spent computing its maps.
        blank: method -> how many of its maps were all zero.
        predictions: [n] the zero-shot predicted class of every image; ``labels`` the true ones or None.
        object_share: the fraction of all pixels that lie inside a mask.
        gallery: the first images and their maps.
    """

    methods: list[str]
    meters: dict[str, SegmentationMeter]
    by_correctness: dict[tuple[str, bool], SegmentationMeter]
    seconds: dict[str, float]
    blank: dict[str, int]
    predictions: torch.Tensor
    labels: torch.Tensor | None
    object_share: float
    gallery: Gallery

    @property
    def n_images(self) -> int:
        return len(self.predictions)

    @property
    def accuracy(self) -> float | None:
        """Zero-shot accuracy (fraction) of the predictions, or ``None`` without labels."""
        return None if self.labels is None else (self.predictions == self.labels).float().mean().item()

    def table(self) -> "pd.DataFrame":  # noqa: F821
        """Per method and the reference: pixel acc, mIoU, mAP, fg AP (extra), blank maps (fractions),
        time (seconds for all images)."""
        import pandas as pd

        rows = {}
        for name, meter in self.meters.items():
            scores = meter.compute()
            rows[name] = {
                "pixel acc": scores.pixel_accuracy,
                "mIoU": scores.miou,
                "mAP": scores.mean_ap,
                "fg AP (extra)": scores.mean_ap_foreground,
                "blank maps": self.blank.get(name, scores.n_images) / scores.n_images,
                "time": self.seconds.get(name, np.nan),
            }
        return pd.DataFrame(rows).T

    def split_table(self) -> "pd.DataFrame":  # noqa: F821
        """Per method: mIoU and fg AP over the images classified right and wrong (NaN where none;
        no rows without labels)."""
        import pandas as pd

        rows = {}
        for name in self.methods if self.labels is not None else []:
            row = {}
            for right, label in ((True, "right"), (False, "wrong")):
                meter = self.by_correctness[(name, right)]
                scores = meter.compute() if meter.aps else None
                row[f"mIoU ({label})"] = scores.miou if scores else np.nan
                row[f"fg AP ({label})"] = scores.mean_ap_foreground if scores else np.nan
            rows[name] = row
        return pd.DataFrame(rows, columns=list(rows), dtype=float).T

    def verdict(
        self,
        method: str = "decomposition",
        metrics: Sequence[str] = ("pixel acc", "mIoU", "mAP", "fg AP (extra)"),
    ) -> str:
        """Where ``method`` ranks among the methods on each metric, in words ("best of the five on mIoU")."""
        table = self.table()
        words = []
        for metric in metrics:
            better = [
                m for m in self.methods if m != method and table.loc[m, metric] > table.loc[method, metric]
            ]
            words.append(
                f"best of the {len(self.methods)} on {metric}"
                if not better
                else f"rank {len(better) + 1} of {len(self.methods)} on {metric} (behind {', '.join(better)})"
            )
        return "; ".join(words)

    def beating(self, reference: str = REFERENCE, metric: str = "mIoU") -> list[str]:
        """The methods whose ``metric`` is above that of ``reference``."""
        table = self.table()
        return [m for m in self.methods if table.loc[m, metric] > table.loc[reference, metric]]


def _named(methods: Mapping[str, Method] | Sequence[str | Method]) -> dict[str, Method]:
    if isinstance(methods, Mapping):
        named = dict(methods)
    else:
        named = {}
        for method in methods:
            if isinstance(method, str):
                if method not in METHODS:
                    raise KeyError(
                        f"Unknown method {method!r}; choose one of {list(METHODS)} or pass a function."
                    )
                named[method] = METHODS[method]
            else:
                function = getattr(method, "func", method)  # functools.partial keeps the function
                named[getattr(function, "__name__", repr(method))] = method
    if not named or REFERENCE in named:
        raise ValueError(f"compare needs at least one method, none named {REFERENCE!r}.")
    return named


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    methods: Mapping[str, Method] | Sequence[str | Method],
    bundle: ClipBundle,
    data: SegmentationSet,
    *,
    batch_size: int = 32,
    n_show: int = 4,
) -> Comparison:
    """Score every method on every image of ``data`` with the Chefer et al. protocol, in one pass.

    Args:
        methods: name -> function ``(model, images, classifier) -> [B, H, W]``, or a list of
            :data:`~clipdecomp.segmentation.METHODS` names and functions (named by ``__name__``).
        bundle: the model.
        data: the images, masks and classifier (:func:`segmentation_set`).
        batch_size: images per pass.
        n_show: images kept in the gallery.
    """
    named = _named(methods)
    meters = {name: SegmentationMeter() for name in [*named, REFERENCE]}
    by_correctness = {(name, right): SegmentationMeter() for name in named for right in (True, False)}
    seconds, blank = dict.fromkeys(named, 0.0), dict.fromkeys(named, 0)
    classifier = data.classifier.to(bundle.device)
    object_pixels = all_pixels = 0
    predictions, shown = [], []
    for images, masks, labels in data.batches(batch_size):
        images = images.to(bundle.device)
        predicted = predict(bundle, images, classifier).cpu()
        correct = None if labels is None else predicted == labels
        maps_now = {}
        for name, method in named.items():
            _synchronise(bundle.device)
            start = time.perf_counter()
            maps = method(bundle, images, classifier)
            _synchronise(bundle.device)
            seconds[name] += time.perf_counter() - start
            maps = maps.detach().cpu()
            meters[name].update(maps, masks)
            blank[name] += int((maps.flatten(1).amax(1) == 0).sum())
            for right in (True, False) if correct is not None else ():
                if (correct == right).any():
                    by_correctness[(name, right)].update(maps[correct == right], masks[correct == right])
            maps_now[name] = maps
        meters[REFERENCE].update(torch.zeros(masks.shape), masks)
        object_pixels, all_pixels = object_pixels + int(masks.sum()), all_pixels + masks.numel()
        if sum(len(s[0]) for s in shown) < n_show:
            shown.append((images.cpu(), masks, predicted, maps_now))
        predictions.append(predicted)
    if not predictions:
        raise ValueError(f"{data} yielded no images.")
    gallery = Gallery(
        torch.cat([s[0] for s in shown])[:n_show],
        torch.cat([s[1] for s in shown])[:n_show],
        torch.cat([s[2] for s in shown])[:n_show],
        {name: torch.cat([s[3][name] for s in shown])[:n_show] for name in named},
    )
    return Comparison(
        list(named),
        meters,
        by_correctness,
        seconds,
        blank,
        torch.cat(predictions),
        data.labels,
        object_pixels / all_pixels,
        gallery,
    )
