"""Spatial maps: where in the image a text direction is written into the embedding.

From a spatial decomposition, each (layer, token, head) term dotted with a text embedding says how
much that image patch, through that head, moves the embedding towards the text. Summing over the
selected heads and dropping the CLS token gives a patch-grid map; bilinear upsampling gives a
heatmap at image resolution.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .decomposition import Decomposition

__all__ = ["patch_scores", "heatmap", "contrastive_heatmap", "joint_map", "overlay", "pointing_game"]


def _select(parts: Decomposition, heads: Sequence[tuple[int, int]] | None) -> torch.Tensor:
    """[B, N, d'] per-token terms summed over ``heads`` (default: every head with spatial detail)."""
    if not parts.spatial:
        raise ValueError("Spatial maps need decompose(..., spatial=True).")
    if heads is None:
        return parts.heads.sum((1, 3))
    missing = sorted({l for l, _ in heads if l not in parts.head_layers})
    if missing:
        raise ValueError(f"Layers {missing} have no spatial detail; decompose with layers including them "
                         f"(have {parts.head_layers}).")
    return sum(parts.heads[:, parts.head_layers.index(l), :, h] for l, h in heads)


def patch_scores(parts: Decomposition, direction: torch.Tensor,
                 heads: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """[B, rows, cols] contribution of each image patch along ``direction`` ([d'], e.g. a text embedding)."""
    tokens = _select(parts, heads) @ direction.to(parts.heads)
    rows, cols = parts.grid_size
    return tokens[:, 1:].reshape(-1, rows, cols)  # token 0 (CLS) has no place in the image


def heatmap(parts: Decomposition, direction: torch.Tensor, size: tuple[int, int] | int,
            heads: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """[B, H, W] patch scores upsampled bilinearly to the image size (positive: towards the text)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = patch_scores(parts, direction, heads)[:, None]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]


def contrastive_heatmap(parts: Decomposition, text_a: torch.Tensor, text_b: torch.Tensor,
                        size: tuple[int, int] | int, heads: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Heatmap along ``text_a - text_b``: where the image speaks for A rather than B."""
    return heatmap(parts, text_a - text_b, size, heads)


def joint_map(parts: Decomposition, layer: int, head: int, direction: torch.Tensor) -> torch.Tensor:
    """[B, rows, cols] one head's patch map along one direction (e.g. one of its TEXT SPAN texts)."""
    return patch_scores(parts, direction, heads=[(layer, head)])


def overlay(ax, image: np.ndarray, heat: torch.Tensor | np.ndarray, alpha: float = 0.55,
            cmap: str = "RdBu_r", title: str | None = None) -> None:
    """Draw ``heat`` ([H, W]) over ``image`` on a matplotlib axis, symmetric colour scale around 0."""
    heat = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    limit = float(np.abs(heat).max()) or 1.0
    ax.imshow(image)
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=-limit, vmax=limit,
              extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def pointing_game(heat: torch.Tensor, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[B] bool: does the hottest pixel of each map ([B, H, W]) fall inside the object mask ([B, H, W])?"""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if heat.shape != masks.shape:
        raise ValueError(f"heat maps {tuple(heat.shape)} and masks {tuple(masks.shape)} differ in shape: "
                         "upsample the maps to the image size first (clipdecomp.spatial.heatmap(..., size=64)).")
    hottest = heat.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, hottest[:, None])[:, 0]
