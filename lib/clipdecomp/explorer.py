"""An interactive head explorer that also works in the static site, with no kernel and no internet.

Pick an image, a head and a text: the explorer shows the head's TEXT SPAN texts, the accuracy cost of
mean-ablating it, its nearest neighbours for the image (retrieval by that head), and its heatmap for
the text. Every state is precomputed and stored as widgets; the dropdowns switch between them with
``jslink`` in the browser, so the same widget responds live in Jupyter/Colab and in the saved HTML.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Sequence

import ipywidgets as widgets
import numpy as np
import torch
from PIL import Image

from .ablation import mean_ablate
from .decomposition import Decomposition
from .retrieval import nearest
from .spatial import heatmap
from .text_span import TextSpanResult
from .zero_shot import task_accuracies

__all__ = ["HeadCard", "build_explorer"]


@dataclass
class HeadCard:
    """What the explorer says about one head."""

    label: str
    texts: list[str]
    ablated_accuracy: dict[str, float]

    @classmethod
    def best(
        cls,
        parts: Decomposition,
        spans: dict[str, TextSpanResult],
        pool: Sequence[str],
        classifiers: dict[str, torch.Tensor],
        attributes: dict[str, np.ndarray],
        n: int,
    ) -> list["HeadCard"]:
        """Cards for the ``n`` heads whose TEXT SPAN texts explain most of their variance, best first:
        each head's texts, and the zero-shot accuracy of every task with that head mean-ablated."""
        ranked = sorted(spans, key=lambda label: -float(spans[label].cumulative_explained[-1]))[:n]
        return [
            cls(
                label,
                spans[label].texts(pool),
                task_accuracies(mean_ablate(parts, [label]), classifiers, attributes),
            )
            for label in ranked
        ]


def _picture(array: np.ndarray, alt: str) -> widgets.HTML:
    """An [H, W, 3] uint8 image as an inline PNG ``<img>`` with alt text, inside an HTML widget."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    source = base64.b64encode(buffer.getvalue()).decode()
    return widgets.HTML(f'<img src="data:image/png;base64,{source}" alt="{html.escape(alt)}">')


def _overlay(image: np.ndarray, heat: np.ndarray, scale: int) -> np.ndarray:
    """Blend a symmetric red (towards the text) / blue (away) heatmap into the image, upscaled."""
    import matplotlib

    limit = float(np.abs(heat).max()) or 1.0
    colours = matplotlib.colormaps["RdBu_r"]((heat / limit + 1) / 2)[..., :3]
    blend = 0.45 * image.astype(float) / 255 + 0.55 * colours
    big = np.kron(blend, np.ones((scale, scale, 1)))
    return (255 * big.clip(0, 1)).astype(np.uint8)


def _strip(images: Sequence[np.ndarray], scale: int) -> np.ndarray:
    """Images side by side with a white gap, upscaled."""
    gap = np.full((images[0].shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([part for image in images for part in (image, gap)][:-1], axis=1)
    return np.kron(row, np.ones((scale, scale, 1), np.uint8))


def build_explorer(
    images: np.ndarray,
    queries: Sequence[int],
    spatial_parts: Decomposition,
    head_terms: dict[str, torch.Tensor],
    cards: Sequence[HeadCard],
    texts: Sequence[str],
    text_embeddings: torch.Tensor,
    k: int = 5,
    scale: int = 2,
) -> widgets.Widget:
    """Precompute every (head, image, text) state and wire the dropdowns to them client-side.

    Args:
        images: [n, H, W, 3] uint8 gallery (retrieval searches all of it).
        queries: gallery indices offered in the image dropdown.
        spatial_parts: spatial decomposition of ``images[queries]`` (same order), with head detail for
            every head in ``cards``.
        head_terms: label -> [n, d'] direct terms of that head over the whole gallery.
        cards: the heads offered, with their TEXT SPAN texts and ablated accuracies.
        texts: the texts offered for heatmaps; ``text_embeddings`` [T, d'] their embeddings.
    """
    size = images.shape[1:3]
    image_choice = widgets.Dropdown(
        options=[(f"image {q}", i) for i, q in enumerate(queries)], description="image"
    )
    head_choice = widgets.Dropdown(
        options=[(card.label, i) for i, card in enumerate(cards)], description="head"
    )
    text_choice = widgets.Dropdown(options=[(text, i) for i, text in enumerate(texts)], description="text")
    head_pages = []
    for card in cards:
        maps = [
            heatmap(spatial_parts, text_embeddings[t], size, heads=[card.label]).cpu().numpy()
            for t in range(len(texts))
        ]
        per_image = []
        for row, query in enumerate(queries):
            heat_stack = widgets.Stack(
                [
                    _picture(
                        _overlay(images[query], maps[t][row], 2 * scale),
                        f"Image {query} tinted by {card.label}'s heatmap for '{texts[t]}': "
                        "red towards the text, "
                        "blue away from it.",
                    )
                    for t in range(len(texts))
                ],
                selected_index=0,
            )
            widgets.jslink((text_choice, "index"), (heat_stack, "selected_index"))
            neighbours = nearest(head_terms[card.label], query, k=k).tolist()
            strip = _picture(
                _strip([images[query]] + [images[i] for i in neighbours], scale),
                f"Image {query}, then the {k} gallery images closest to it in {card.label}'s output.",
            )
            per_image.append(
                widgets.HBox(
                    [
                        widgets.VBox([widgets.HTML("<b>heatmap for the text</b>"), heat_stack]),
                        widgets.VBox(
                            [
                                widgets.HTML(f"<b>query, then its {k} nearest images for {card.label}</b>"),
                                strip,
                            ]
                        ),
                    ]
                )
            )
        image_stack = widgets.Stack(per_image, selected_index=0)
        widgets.jslink((image_choice, "index"), (image_stack, "selected_index"))
        accuracy = ", ".join(f"{task} {100 * value:.1f}%" for task, value in card.ablated_accuracy.items())
        summary = widgets.HTML(
            f"<p><b>{card.label}</b> TEXT SPAN: " + "; ".join(html.escape(t) for t in card.texts) + "</p>"
            f"<p>Zero-shot accuracy with {card.label} mean-ablated: {html.escape(accuracy)}</p>"
        )
        head_pages.append(widgets.VBox([summary, image_stack]))
    pages = widgets.Stack(head_pages, selected_index=0)
    widgets.jslink((head_choice, "index"), (pages, "selected_index"))
    return widgets.VBox([widgets.HBox([image_choice, head_choice, text_choice]), pages])
