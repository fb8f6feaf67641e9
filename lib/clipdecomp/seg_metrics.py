"""Segmentation metrics of the Chefer et al. (2021) protocol, used by the paper's Table 3.

For each image, the heatmap is min-max normalised and binarised at its own mean (foreground where
the map is strictly above the mean). Over the whole dataset:

* pixel accuracy = correctly labelled pixels / all pixels;
* IoU per class (background, foreground) = summed intersections / summed unions, accumulated over
  all images (not a mean of per-image IoUs); mIoU = the mean of the two;
* mAP = mean over images of the average precision of the *continuous* map. As in the protocol's
  reference code, one image's AP pools both classes: every pixel appears twice, scored ``1 - map``
  for background and ``map`` for foreground, against the one-hot ground truth.

A class that never occurs (no union) gets IoU 0, as in the reference code.

Beyond the protocol, ``mean_ap_foreground`` is the plain AP of the map for the foreground alone. On
small objects the pooled AP is dominated by the background: a constant map already scores about
``b^2 + (1 - b) / 2`` for a background share ``b`` (0.93 at b = 0.95), so the foreground-only AP is
the more telling number there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import average_precision_score

__all__ = [
    "SegmentationMeter",
    "SegmentationScores",
    "average_precision",
    "binarise",
    "foreground_ap",
    "normalise",
    "segmentation_scores",
]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each [H, W] map of a [B, H, W] batch to [0, 1]; a constant map becomes zeros."""
    maps = torch.as_tensor(maps).float()
    low = maps.amin((-2, -1), keepdim=True)
    span = maps.amax((-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), torch.zeros_like(maps))


def binarise(maps: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool foreground: the normalised map strictly above its own mean."""
    maps = normalise(maps)
    return maps > maps.mean((-2, -1), keepdim=True)


def average_precision(heat: torch.Tensor, mask: torch.Tensor) -> float:
    """AP of one continuous map [H, W] against a bool mask [H, W], both classes pooled (see module doc)."""
    scores = normalise(torch.as_tensor(heat)[None])[0].flatten().double().numpy()
    truth = torch.as_tensor(mask, dtype=torch.bool).flatten().numpy()
    return float(
        average_precision_score(np.concatenate([~truth, truth]), np.concatenate([1 - scores, scores]))
    )


def foreground_ap(heat: torch.Tensor, mask: torch.Tensor) -> float:
    """Plain AP of one map [H, W] ranking the foreground pixels of a bool mask [H, W] (0 if it has none)."""
    truth = torch.as_tensor(mask, dtype=torch.bool).flatten().numpy()
    if not truth.any():
        return 0.0
    return float(average_precision_score(truth, torch.as_tensor(heat).flatten().double().numpy()))


@dataclass
class SegmentationScores:
    """Dataset-level scores (fractions in [0, 1]).

    Attributes:
        pixel_accuracy: correct pixels / all pixels.
        iou: (background IoU, foreground IoU), each from intersections and unions summed over images.
        miou: mean of the two IoUs.
        mean_ap: mean over images of the per-image average precision (both classes pooled).
        mean_ap_foreground: mean over images of the foreground-only AP (not part of the protocol).
        n_images: how many images were scored.
    """

    pixel_accuracy: float
    iou: tuple[float, float]
    miou: float
    mean_ap: float
    mean_ap_foreground: float
    n_images: int

    def percent(self) -> dict[str, float]:
        """The three headline numbers in %, keyed like the paper's table ("pixel acc", "mIoU", "mAP")."""
        return {"pixel acc": 100 * self.pixel_accuracy, "mIoU": 100 * self.miou, "mAP": 100 * self.mean_ap}


@dataclass
class SegmentationMeter:
    """Accumulates the protocol's counts over batches; :meth:`compute` gives :class:`SegmentationScores`.

    Example:
        >>> meter = SegmentationMeter()
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> masks[:, :2] = True                          # the object: the top half
        >>> meter.update(masks.float(), masks)           # a perfect map, one batch
        >>> meter.update(torch.zeros(1, 4, 4), masks[:1])  # a blank map: background everywhere
        >>> round(meter.compute().miou, 3)             # IoUs 24/32 (background) and 16/24 (object)
        0.708
    """

    correct: int = 0
    pixels: int = 0
    intersection: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))
    union: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))
    aps: list[float] = field(default_factory=list)
    foreground_aps: list[float] = field(default_factory=list)

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch: continuous maps [B, H, W] (any range) and ground-truth masks [B, H, W] (bool
        or 0/1)."""
        maps = torch.as_tensor(maps).detach().cpu().float()
        masks = torch.as_tensor(masks).detach().cpu()
        if maps.ndim == 2:
            maps, masks = maps[None], masks[None]
        if maps.shape != masks.shape or maps.ndim != 3:
            raise ValueError(
                f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [B, H, W]; "
                "upsample the maps to the mask size or crop the masks like the images."
            )
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must be binary (bool or 0/1): 1 = foreground object, 0 = background.")
        masks = masks.bool()
        predicted = binarise(maps)
        self.correct += int((predicted == masks).sum())
        self.pixels += masks.numel()
        for label, (pred, truth) in enumerate([(~predicted, ~masks), (predicted, masks)]):
            self.intersection[label] += int((pred & truth).sum())
            self.union[label] += int((pred | truth).sum())
        self.aps += [average_precision(heat, mask) for heat, mask in zip(maps, masks)]
        self.foreground_aps += [foreground_ap(heat, mask) for heat, mask in zip(maps, masks)]

    def compute(self) -> SegmentationScores:
        """Scores over everything added so far."""
        if not self.aps:
            raise ValueError("No images were added: call update(maps, masks) first.")
        iou = np.where(self.union > 0, self.intersection / np.maximum(self.union, 1), 0.0)
        return SegmentationScores(
            pixel_accuracy=self.correct / self.pixels,
            iou=(float(iou[0]), float(iou[1])),
            miou=float(iou.mean()),
            mean_ap=float(np.mean(self.aps)),
            mean_ap_foreground=float(np.mean(self.foreground_aps)),
            n_images=len(self.aps),
        )


def segmentation_scores(maps: torch.Tensor, masks: torch.Tensor) -> SegmentationScores:
    """Scores of a whole set at once: maps and masks [n, H, W]."""
    meter = SegmentationMeter()
    meter.update(maps, masks)
    return meter.compute()
