"""Figures the chapters draw, one function per kind of figure; each returns its matplotlib figure.

Chapters call these so that their cells show the experiment, not the plotting code. Every function
takes the library's result objects (or plain tensors) and draws them with matplotlib's defaults as
set by :func:`clipdecomp.notebook.setup`.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from .spurious import GroupReport, SpuriousComparison, SpuriousTask

__all__ = ["image_strip", "head_choice", "cue_and_label", "group_bars", "reconstruction_curve", "explained_variance"]


def image_strip(images: np.ndarray | Sequence[np.ndarray], titles: Sequence[str] = (), size: float = 1.5) -> plt.Figure:
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
    axes[0].bar(range(len(fractions)), fractions, color=["C3" if i < n_chosen else "C0" for i in range(len(fractions))])
    axes[0].set_xticks(range(len(fractions)), [f"L{l}H{h}" for (l, h), _ in result.ranked], rotation=90, fontsize=7)
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
    ax.set_title("Each component's share of the logit difference (red: chosen heads; grey: layers, MLPs)", fontsize=9)
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
        ax.bar(np.arange(len(groups)) + (k - (len(reports) - 1) / 2) * width, values, width,
               yerr=[values - low, high - values], capsize=3, label=name)
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
        ax.plot(range(1, steps + 1), 100 * mean_curve.numpy(), label=pool, ls="--" if pool == "random" else "-")
    ax.set_xlabel("texts picked")
    ax.set_ylabel("variance explained (%)")
    ax.set_title("Mean over heads")
    ax.legend(fontsize=8)
    return fig
