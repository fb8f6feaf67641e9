"""Removing a spurious cue by mean-ablating heads (the paper's Waterbirds experiment).

A classifier that leans on the background fails on the groups where background and label disagree.
If some heads write mostly "place" information, mean-ablating them removes the cue. This module
ranks heads by how much of what they write lies along a concept (e.g. texts about places), picks
how many to ablate on a validation split, and reports per-group accuracy with bootstrap confidence
intervals, beside a baseline that ablates the same number of random heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .decomposition import Decomposition

__all__ = ["GroupReport", "group_report", "rank_heads_by_concept", "choose_head_count", "random_head_sets",
           "cue_and_label_signal"]


@dataclass
class GroupReport:
    """Accuracies (fractions) with 95% bootstrap intervals ``(low, high)``."""

    average: float
    average_ci: tuple[float, float]
    worst_group: float
    worst_group_ci: tuple[float, float]
    per_group: dict[int, float]
    per_group_ci: dict[int, tuple[float, float]]

    def row(self) -> dict[str, str]:
        """Percentages with intervals, for a table."""
        fmt = lambda v, ci: f"{100 * v:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"  # noqa: E731
        return {"average": fmt(self.average, self.average_ci), "worst group": fmt(self.worst_group, self.worst_group_ci)}


def group_report(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                 n_boot: int = 1000, seed: int = 0) -> GroupReport:
    """Average, worst-group and per-group accuracy, with percentile bootstrap CIs resampled within groups."""
    correct = (predictions.cpu() == labels.cpu()).numpy().astype(float)
    groups = groups.cpu().numpy()
    ids = sorted(np.unique(groups).tolist())
    members = {g: np.flatnonzero(groups == g) for g in ids}
    rng = np.random.default_rng(seed)
    boot_group = {g: np.empty(n_boot) for g in ids}
    boot_average = np.empty(n_boot)
    for b in range(n_boot):
        hits = 0.0
        for g in ids:
            sample = correct[rng.choice(members[g], size=len(members[g]))]
            boot_group[g][b] = sample.mean()
            hits += sample.sum()
        boot_average[b] = hits / len(correct)
    boot_worst = np.min(np.stack([boot_group[g] for g in ids]), axis=0)
    ci = lambda values: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))  # noqa: E731
    per_group = {g: float(correct[members[g]].mean()) for g in ids}
    return GroupReport(average=float(correct.mean()), average_ci=ci(boot_average),
                       worst_group=min(per_group.values()), worst_group_ci=ci(boot_worst),
                       per_group=per_group, per_group_ci={g: ci(boot_group[g]) for g in ids})


def rank_heads_by_concept(head_terms: torch.Tensor, concept: torch.Tensor,
                          head_layers: Sequence[int]) -> list[tuple[tuple[int, int], float]]:
    """Rank heads by the fraction of their variance that lies in the span of ``concept`` directions.

    Args:
        head_terms: [n, L', H, d'] direct contributions over a (validation) set of images.
        concept: [k, d'] text embeddings describing the concept (e.g. places, habitats, backgrounds).
        head_layers: the layer index of each of the L' rows.
    Returns:
        ``[((layer, head), fraction), ...]`` sorted from the most concept-laden head.
    """
    basis = torch.linalg.qr(concept.T.to(head_terms)).Q                     # [d', k] orthonormal span
    centred = head_terms - head_terms.mean(0)
    total = centred.pow(2).sum((0, -1))
    inside = (centred @ basis).pow(2).sum((0, -1))
    fraction = (inside / total.clamp_min(1e-12)).cpu()
    ranked = [((head_layers[i], h), float(fraction[i, h])) for i in range(fraction.shape[0])
              for h in range(fraction.shape[1])]
    return sorted(ranked, key=lambda item: -item[1])


def choose_head_count(ranked: Sequence[tuple[int, int]], worst_group_accuracy: Callable[[list[tuple[int, int]]], float],
                      counts: Sequence[int]) -> tuple[int, dict[int, float]]:
    """Pick how many top-ranked heads to ablate by worst-group accuracy on a VALIDATION split.

    ``worst_group_accuracy(heads)`` must evaluate on validation data only; the test split is never
    looked at. Returns the best count (the smallest among ties) and the score of every count tried.
    """
    scores = {k: worst_group_accuracy(list(ranked[:k])) for k in counts}
    best = max(scores.values())
    return min(k for k, v in scores.items() if v == best), scores


def random_head_sets(all_heads: Sequence[tuple[int, int]], k: int, trials: int = 5, seed: int = 0) -> list[list[tuple[int, int]]]:
    """``trials`` random sets of ``k`` distinct heads: the baseline for any head selection."""
    rng = np.random.default_rng(seed)
    return [[tuple(all_heads[i]) for i in rng.choice(len(all_heads), size=k, replace=False)] for _ in range(trials)]


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = (x.norm() * y.norm()).item()
    return float((x @ y).item() / scale) if scale > 0 else 0.0


def cue_and_label_signal(parts: Decomposition, direction: torch.Tensor, label: torch.Tensor,
                         cue: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """What each component's share of a logit difference tracks: the spurious cue, or the label.

    For every part of ``parts.stack("head")`` (labels ``"embed"``, ``"L3H1"``, ``"mlp_2"``, ...), its
    score is ``term @ direction`` (e.g. ``direction = classifier[:, 1] - classifier[:, 0]``). Returns the
    labels, the correlation of each score with ``cue`` ([n] 0/1), and its correlation with ``label``
    *within* each cue value (averaged over the cue values). Ablating components can only help the
    worst group if some remaining component has a label correlation within the cue.
    """
    terms, labels = parts.stack("head")
    scores = terms.float() @ direction.float().to(terms.device)
    cue, label = torch.as_tensor(cue), torch.as_tensor(label)
    with_cue = torch.tensor([_correlation(scores[:, k], cue) for k in range(len(labels))])
    within = torch.tensor([np.mean([_correlation(scores[cue == v, k], label[cue == v]) for v in cue.unique()])
                           for k in range(len(labels))])
    return labels, with_cue, within
