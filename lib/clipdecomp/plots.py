"""Figures the chapters draw, one function per kind of figure; each returns its matplotlib figure.

Chapters call these so that their cells show the experiment, not the plotting code. Every function
takes the library's result objects (or plain tensors) and draws them with matplotlib's defaults as
set by :func:`clipdecomp.notebook.setup`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .retrieval import RetrievalEvaluation
from .segmentation_eval import Comparison
from .spatial import ContrastSet
from .spurious import GroupReport, SpuriousComparison, SpuriousTask

__all__ = [
    "image_strip",
    "head_choice",
    "cue_and_label",
    "group_bars",
    "reconstruction_curve",
    "explained_variance",
    "pictures",
    "percent",
    "overlay",
    "head_score_maps",
    "neighbour_gallery",
    "text_maps",
    "contrastive_maps",
    "head_grid",
    "image_maps",
    "segmentation_gallery",
]


def image_strip(
    images: np.ndarray | Sequence[np.ndarray], titles: Sequence[str] = (), size: float = 1.5
) -> plt.Figure:
    """A row of images (uint8 [H, W, 3] each) with optional titles."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i])
        ax.set_axis_off()
        if i < len(titles):
            ax.set_title(titles[i], fontsize=8)
    return fig


def head_choice(result: SpuriousComparison) -> plt.Figure:
    """Heads ranked by the concept (chosen ones in red) and validation worst-group accuracy per head count."""
    n_chosen = len(result.chosen)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    fractions = [f for _, f in result.ranked]
    axes[0].bar(
        range(len(fractions)),
        fractions,
        color=["C3" if i < n_chosen else "C0" for i in range(len(fractions))],
    )
    axes[0].set_xticks(
        range(len(fractions)), [f"L{l}H{h}" for (l, h), _ in result.ranked], rotation=90, fontsize=7
    )
    axes[0].set_ylabel("variance fraction in the concept span")
    axes[0].set_title("Heads ranked by the cue's concept (validation); red: chosen")
    counts = list(result.val_scores)
    axes[1].plot(counts, [100 * result.val_scores[k] for k in counts], "o-")
    axes[1].axvline(n_chosen, color="C3", ls="--", label=f"chosen: {n_chosen}")
    axes[1].set_xlabel("number of top-ranked heads ablated")
    axes[1].set_ylabel("validation worst-group accuracy (%)")
    axes[1].legend()
    fig.tight_layout()
    return fig


def cue_and_label(task: SpuriousTask, chosen: Sequence[tuple[int, int]]) -> plt.Figure:
    """Each component's correlation with the cue (x) and with the label within the cue (y)."""
    names, with_cue, within = task.signal()
    chosen_names = {f"L{l}H{h}" for l, h in chosen}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = ["C3" if n in chosen_names else ("C0" if n.startswith("L") else "C7") for n in names]
    ax.scatter(with_cue, within, c=colours)
    for n, x, y in zip(names, with_cue.tolist(), within.tolist()):
        if n in chosen_names or y == within.max().item():
            ax.annotate(n, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlabel("correlation with the cue (place)")
    ax.set_ylabel("correlation with the label, within place")
    ax.set_title(
        "Each component's share of the logit difference (red: chosen heads; grey: layers, MLPs)", fontsize=9
    )
    return fig


def group_bars(reports: dict[str, GroupReport], group_names: Sequence[str]) -> plt.Figure:
    """Per-group accuracy with 95% bootstrap intervals, one bar per condition in ``reports``."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(reports)
    for k, (name, report) in enumerate(reports.items()):
        groups = sorted(report.per_group)
        values = np.array([100 * report.per_group[g] for g in groups])
        low = np.array([100 * report.per_group_ci[g][0] for g in groups])
        high = np.array([100 * report.per_group_ci[g][1] for g in groups])
        ax.bar(
            np.arange(len(groups)) + (k - (len(reports) - 1) / 2) * width,
            values,
            width,
            yerr=[values - low, high - values],
            capsize=3,
            label=name,
        )
    ax.set_xticks(range(len(group_names)), group_names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    ax.set_title("Per-group accuracy with 95% bootstrap intervals")
    return fig


def reconstruction_curve(curve: "pd.DataFrame", intact: float) -> plt.Figure:  # noqa: F821
    """Mean zero-shot accuracy against the number of texts per head, one line per pool."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for pool in curve:
        ax.plot(curve.index, 100 * curve[pool], marker="o", label=pool, ls="--" if pool == "random" else "-")
    ax.axhline(100 * intact, color="black", lw=1, ls=":", label="heads intact")
    ax.set_xlabel("texts per head (m)")
    ax.set_ylabel("mean zero-shot accuracy (%)")
    ax.set_title("Heads of the last layers replaced by their TEXT SPAN reconstruction")
    ax.legend(fontsize=8)
    return fig


def explained_variance(spans_by_pool: dict) -> plt.Figure:
    """Mean over heads of the variance explained by the first k texts, one line per pool."""
    import torch

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for pool, results in spans_by_pool.items():
        steps = min(len(r.cumulative_explained) for r in results.values())
        mean_curve = torch.stack([r.cumulative_explained[:steps] for r in results.values()]).mean(0)
        ax.plot(
            range(1, steps + 1), 100 * mean_curve.numpy(), label=pool, ls="--" if pool == "random" else "-"
        )
    ax.set_xlabel("texts picked")
    ax.set_ylabel("variance explained (%)")
    ax.set_title("Mean over heads")
    ax.legend(fontsize=8)
    return fig


def pictures(preprocess: Callable, images: torch.Tensor) -> np.ndarray:
    """[B, H, W, 3] RGB in [0, 1] from preprocessed images [B, 3, H, W] (or one [3, H, W]): the
    normalisation of ``preprocess`` (a torchvision ``Compose``) undone."""
    from torchvision.transforms import Normalize

    images = images.detach().cpu().float()
    images = images[None] if images.ndim == 3 else images
    normalise = next((t for t in getattr(preprocess, "transforms", []) if isinstance(t, Normalize)), None)
    if normalise is not None:
        mean, std = (
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (normalise.mean, normalise.std)
        )
        images = images * std + mean
    return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage for prose ("12.3%"); ``None`` or NaN as "n/a"."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}%}"


def overlay(
    ax: plt.Axes,
    image: np.ndarray,
    heat: torch.Tensor | np.ndarray,
    alpha: float = 0.55,
    cmap: str = "RdBu_r",
    title: str | None = None,
) -> None:
    """Draw ``heat`` ([H, W]) over ``image`` on an axis, on a colour scale symmetric around 0."""
    heat = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    limit = float(np.abs(heat).max()) or 1.0
    ax.imshow(image)
    ax.imshow(
        heat,
        cmap=cmap,
        alpha=alpha,
        vmin=-limit,
        vmax=limit,
        extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5),
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def _grid(rows: int, cols: int, width: float, height: float) -> tuple[plt.Figure, np.ndarray]:
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def head_score_maps(evaluation: RetrievalEvaluation) -> plt.Figure:
    """Per property, two [layer x head] maps: the ground-truth score and the neighbour agreement, the
    best head of each starred."""
    properties, layers = evaluation.properties, list(evaluation.head_layers)
    fig, axes = _grid(2, len(properties), 4.0, 3.2)
    for c, p in enumerate(properties):
        rows = (
            (evaluation.scores[p], "ground truth: share of variance", evaluation.chosen[p]),
            (
                evaluation.agreement[p].numpy(),
                f"retrieval agreement@{evaluation.k}",
                evaluation.best_retrieval[p],
            ),
        )
        for r, (table, title, (layer, head)) in enumerate(rows):
            ax = axes[r, c]
            shown = ax.imshow(table, cmap="viridis", aspect="auto")
            ax.set_title(f"{p}: {title}", fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_yticks(range(len(layers)), layers)
            ax.plot(head, layers.index(layer), "r*", ms=14)
            ax.grid(False)
            fig.colorbar(shown, ax=ax)
    fig.suptitle("Per-head scores on the first half of the images; red star = best head", y=1.01)
    fig.tight_layout()
    return fig


def neighbour_gallery(evaluation: RetrievalEvaluation, query: int, n_show: int) -> plt.Figure:
    """The query (left column) and its ``n_show`` nearest neighbours under each similarity (one row each),
    every thumbnail titled with its property values."""
    data, positions = evaluation.images, evaluation.neighbours(query, n_show)
    dataset = data.dataset

    def picture(i: int) -> np.ndarray:
        return pictures(dataset.preprocess, dataset.image(int(data.indices[i])))[0]

    def describe(i: int) -> str:
        return "\n".join(data.describe(i).values())

    fig, axes = _grid(len(positions), n_show + 1, 1.45, 1.95)
    for r, (name, found) in enumerate(positions.items()):
        axes[r, 0].imshow(picture(query))
        axes[r, 0].set_title(describe(query), fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=8)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        for c in range(1, n_show + 1):
            axes[r, c].set_axis_off()
        for c, j in enumerate(found, start=1):
            axes[r, c].imshow(picture(j))
            axes[r, c].set_title(describe(j), fontsize=7)
    fig.suptitle(f"Query (left column) and its {n_show} nearest neighbours, held-out images", y=1.0)
    fig.tight_layout()
    return fig


def text_maps(study: ContrastSet, n_show: int) -> plt.Figure:
    """One row per image: the image, then its map for each of its texts (:meth:`ContrastSet.texts`)."""
    from .spatial import heatmap

    shown = pictures(study.preprocess, study.images[:n_show])
    fig, axes = _grid(len(shown), len(study.contrasts) + 1, 2.3, 2.3)
    for r, picture in enumerate(shown):
        axes[r, 0].imshow(picture)
        axes[r, 0].set_axis_off()
        axes[r, 0].set_title("image", fontsize=9)
        for c, (title, direction) in enumerate(study.texts(r), start=1):
            overlay(axes[r, c], picture, heatmap(study.parts, direction, study.size)[r], title=title)
    fig.tight_layout()
    return fig


def contrastive_maps(study: ContrastSet, n_show: int) -> plt.Figure:
    """One row per image: the image, then the map along "A minus B" for each pair of
    :attr:`ContrastSet.pairs`."""
    from .spatial import contrastive_heatmap

    shown = pictures(study.preprocess, study.images[:n_show])
    families = list(study.contrasts)
    fig, axes = _grid(len(shown), len(study.pairs) + 1, 2.3, 2.3)
    for r, picture in enumerate(shown):
        texts = study.texts(r)
        axes[r, 0].imshow(picture)
        axes[r, 0].set_axis_off()
        for c, (a, b) in enumerate(study.pairs, start=1):
            (name_a, text_a), (name_b, text_b) = texts[families.index(a)], texts[families.index(b)]
            heat = contrastive_heatmap(study.parts, text_a, text_b, study.size)[r]
            overlay(axes[r, c], picture, heat, title=f"{name_a} - {name_b}")
    fig.tight_layout()
    return fig


def head_grid(maps: torch.Tensor, layers: Sequence[int], title: str) -> plt.Figure:
    """[L', H, rows, cols] patch maps, one small map per head (rows: layers), on one colour scale."""
    limit = maps.abs().max().item() or 1.0
    fig, axes = _grid(maps.shape[0], maps.shape[1], 1.4, 1.4)
    for i, layer in enumerate(layers):
        for h in range(maps.shape[1]):
            axes[i, h].imshow(maps[i, h], cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[i, h].set_xticks([])
            axes[i, h].set_yticks([])
            if h == 0:
                axes[i, h].set_ylabel(f"L{layer}", fontsize=8)
            if i == 0:
                axes[i, h].set_title(f"H{h}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_maps(images: np.ndarray, maps: torch.Tensor, title: str) -> plt.Figure:
    """One row: each image ([n, H, W, 3]) with its map ([n, H, W]) overlaid."""
    fig, axes = _grid(1, len(images), 2.3, 2.5)
    for r, (image, heat) in enumerate(zip(images, maps)):
        overlay(axes[0, r], image, heat, title=f"image {r}")
    fig.suptitle(title, y=1.05)
    return fig


def segmentation_gallery(
    comparison: Comparison, class_names: Sequence[str], preprocess: Callable
) -> plt.Figure:
    """One row per gallery image: the image with its mask outlined and its predicted class, then each
    method's map (0 to 1) with the mask outline on top."""
    gallery, methods = comparison.gallery, comparison.methods
    shown = pictures(preprocess, gallery.images)
    fig, axes = _grid(len(shown), len(methods) + 1, 2.1, 2.2)
    for r, picture in enumerate(shown):
        mask = gallery.masks[r].numpy()
        axes[r, 0].imshow(picture)
        axes[r, 0].contour(mask, levels=[0.5], colors="white", linewidths=1)
        axes[r, 0].set_title("pred: " + class_names[int(gallery.predicted[r])][:22], fontsize=8)
        for c, name in enumerate(methods, start=1):
            axes[r, c].imshow(gallery.maps[name][r].numpy(), cmap="inferno", vmin=0, vmax=1)
            axes[r, c].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def cumulative_sweep(sweep: "pd.DataFrame", tasks: Sequence[str]) -> plt.Figure:  # noqa: F821
    """Accuracy per task as attention layers 0..l are mean-ablated: cached and (if present) real."""
    kinds = [kind for kind in ("cached", "real") if f"{tasks[0]} ({kind})" in sweep]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.6), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for task in tasks:
            ax.plot(sweep.index, 100 * sweep[f"{task} ({kind})"], "o-", label=task)
        ax.set_xlabel("attention layers 0..l mean-ablated")
        ax.set_title(kind)
    axes[0, 0].set_ylabel("zero-shot accuracy (%)")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle("Cumulative mean-ablation of attention layers", y=1.02)
    return fig


def toy_gallery(samples: "ToySamples", n: int = 8, masks: bool = False) -> plt.Figure:  # noqa: F821
    """The first ``2n`` toy images with a caption each, or ``n`` images above their object masks."""
    fig, axes = plt.subplots(2, n, figsize=(1.75 * n, 4.4 if not masks else 3.8))
    for i in range(n):
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(samples.images[i])
        bottom.imshow(samples.masks[i] if masks else samples.images[n + i], cmap="gray" if masks else None)
        if masks:
            top.set_title(
                ", ".join(v for k, v in samples.describe(i).items() if k in ("shape", "colour", "position")),
                fontsize=7,
            )
        else:
            for ax, caption in ((top, samples.captions[i]), (bottom, samples.captions[n + i])):
                ax.set_title(caption if len(caption) < 28 else caption[:26] + "...", fontsize=6)
        top.set_axis_off()
        bottom.set_axis_off()
    if not masks:
        fig.suptitle("Toy-world samples with one of their training captions")
    return fig


def training_curve(card: dict) -> plt.Figure:
    """A model card's training loss and held-out zero-shot accuracies against the step."""
    import pandas as pd

    curve = pd.DataFrame(card["curve"]).set_index("step")
    tasks = [
        t
        for t in ("colour", "background", "shape", "position", "size", "spurious", "spurious_worst")
        if t in curve
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    axes[0].plot(curve.index, curve["loss"])
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    for task in tasks:
        axes[1].plot(curve.index, 100 * curve[task], marker="o", label=task.replace("_", " "))
    axes[1].set_title("held-out zero-shot accuracy (%) during training")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    return fig


def layer_contributions(parts: "Decomposition", embedding: "torch.Tensor", title: str = "") -> plt.Figure:  # noqa: F821
    """Per layer, for image 0: the norm of each attention layer's and MLP's direct term, and its
    contribution along the (unit) embedding; the CLS embedding term as a dotted line."""
    stacked, labels = parts.stack("layer")
    norms = stacked[0].norm(dim=-1).cpu().numpy()
    along = (stacked[0] @ embedding[0]).cpu().numpy()
    attn = [i for i, name in enumerate(labels) if name.startswith("attn")]
    mlp = [i for i, name in enumerate(labels) if name.startswith("mlp")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharex=True)
    for ax, values, name in (
        (axes[0], norms, "norm of the direct contribution"),
        (axes[1], along, "contribution along the embedding"),
    ):
        ax.plot(range(len(attn)), values[attn], "o-", label="attention layer")
        ax.plot(range(len(mlp)), values[mlp], "s--", label="MLP")
        ax.axhline(values[0], color="gray", lw=1, ls=":", label="CLS embedding")
        ax.set_xlabel("layer")
        ax.set_title(name)
    axes[0].legend()
    fig.suptitle(title, y=1.02)
    return fig


def head_norms(parts: "Decomposition") -> plt.Figure:  # noqa: F821
    """Heat map of the norm of each head's direct term for image 0 (layers x heads)."""
    norms = parts.head_terms()[0].norm(dim=-1).cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4, norms.shape[1] * 0.5), max(3, norms.shape[0] * 0.3)))
    image = ax.imshow(norms, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("norm of each head's direct contribution")
    fig.colorbar(image, ax=ax)
    return fig


def rank1_and_sparsity(rank1: dict[str, torch.Tensor], concentration: dict[str, torch.Tensor]) -> plt.Figure:
    """Chapter 10: histograms over neurons of the rank-1 share and of the top-2% share, per model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    bins = np.linspace(0, 1, 41)
    for name in rank1:
        axes[0].hist(rank1[name].numpy(), bins=bins, alpha=0.6, label=name)
        axes[1].hist(concentration[name].numpy(), bins=bins, alpha=0.6, label=name)
    axes[0].set(xlabel="share of a neuron's centred effect along r_n", ylabel="neurons", title="rank 1?")
    axes[1].axvline(0.02, color="black", lw=1, ls="--", label="evenly spread")
    axes[1].set(xlabel="share held by the neuron's top 2% of images", ylabel="neurons", title="sparse?")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_sweep(sweep: "pd.DataFrame", baseline: float) -> plt.Figure:  # noqa: F821
    """Chapter 10: accuracy lost and embedding change when each MLP layer's effects are mean-ablated."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].bar(sweep.index, 100 * (baseline - sweep["accuracy, mean-ablated"]), color="tab:red")
    axes[0].set(xlabel="MLP layer", ylabel="accuracy lost (points)", title="mean-ablating a layer's effects")
    axes[1].bar(sweep.index, sweep["embedding change (1 - cos)"], color="tab:blue")
    axes[1].set(xlabel="MLP layer", ylabel="1 - cos(edited, original)", title="how far the embedding moves")
    fig.tight_layout()
    return fig


def discovered_concepts(
    images, found: torch.Tensor, pool: Sequence[str], preprocess: Callable, n: int = 4
) -> plt.Figure:
    """Chapter 10: the first ``n`` images of an evaluation set with the texts their neurons found;
    toy images are titled with their attributes, others with their file names."""
    from .toy.groundtruth import toy_samples

    samples = toy_samples(images)
    fig, axes = plt.subplots(1, n, figsize=(11, 3.6), squeeze=False)
    for position, ax in enumerate(axes[0]):
        index = int(images.indices[position])
        if samples is not None:
            ax.imshow(samples.images[index])
            d = samples.describe(index)
            title = f"{d['colour']} {d['shape']}, {d['size']}\n{d['position']}, on {d['background']}"
        else:
            ax.imshow(pictures(preprocess, images.dataset.image(index))[0])
            title = str(images.dataset.ids[index])[-40:]
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("\n".join(pool[j] for j in found[position].tolist()), fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig
